"""Example customer-support agent for trace-source (see README.md): tools in :mod:`support_agent.orders`, the tool
loop in :mod:`support_agent.agent`, OpenTelemetry set-up in :mod:`support_agent.telemetry`, the headless harness in
:mod:`support_agent.harness`."""
