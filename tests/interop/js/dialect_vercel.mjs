// Vercel AI SDK dialect agent for tests/test_dialects_real.py.
//
// Runs a real tool-using agent turn with `ai` (generateText + a `get_weather` tool, multi-step via stopWhen) and
// `@ai-sdk/openai` (the Chat Completions model, `openai.chat(...)`) against the fake OpenAI-compatible server of
// tests/fake_llm.py, with the AI SDK's own OpenTelemetry integration from `@ai-sdk/otel` registered through
// `registerTelemetry(...)` and `experimental_telemetry` set on the call. Spans go through
// @opentelemetry/sdk-trace-base (BatchSpanProcessor) and @opentelemetry/exporter-trace-otlp-http (OTLP/JSON) to
// `trace-source serve`.
//
// Environment:
//   TRACE_SOURCE_OTLP_URL   base URL of serve (http://127.0.0.1:PORT); /v1/traces is appended
//   FAKE_LLM_BASE_URL       http://127.0.0.1:PORT/v1 of the fake model
//   DIALECT_MODEL, DIALECT_ERROR_MODEL   model names for the good run and for the run the fake model fails (HTTP 500)
//   VERCEL_TELEMETRY        "legacy" -> LegacyOpenTelemetry() (the `ai.*` spans of AI SDK v3-v6);
//                           "genai"  -> OpenTelemetry() (v7's GenAI-semconv spans: invoke_agent / chat / execute_tool)
//
// stdout: one JSON line, the same shape as tests/dialect_agents/_common.py prints:
//   {"scenarios": {"ok"|"error": {"trace_ids": [...], "spans": [{trace_id, span_id, name}], "error": str|null,
//                                 "output": str|null}},
//    "span_exports": ["SUCCESS"|"FAILURE", ...], "log_exports": []}

import { context, trace } from '@opentelemetry/api';
import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks';
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-http';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { BasicTracerProvider, BatchSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { createOpenAI } from '@ai-sdk/openai';
import { LegacyOpenTelemetry, OpenTelemetry } from '@ai-sdk/otel';
import { generateText, isStepCount, registerTelemetry, tool } from 'ai';
import { z } from 'zod';

const TASK = "What's the weather in Paris?";
const TOOL_RESULT = 'sunny, 22C';

const otlpUrl = (process.env.TRACE_SOURCE_OTLP_URL ?? 'http://127.0.0.1:4319').replace(/\/+$/, '');
const llmBaseUrl = process.env.FAKE_LLM_BASE_URL ?? 'http://127.0.0.1:8000/v1';
const model = process.env.DIALECT_MODEL ?? 'gpt-fake-mini';
const errorModel = process.env.DIALECT_ERROR_MODEL ?? 'gpt-fake-error';
const mode = process.env.VERCEL_TELEMETRY ?? 'legacy';
if (!['legacy', 'genai'].includes(mode)) {
  process.stderr.write(`VERCEL_TELEMETRY must be legacy or genai, not ${mode}\n`);
  process.exit(2);
}

// Every export result, and every ended span (for the per-scenario trace ids).
const spanExports = [];
const ended = [];
const otlp = new OTLPTraceExporter({ url: `${otlpUrl}/v1/traces`, timeoutMillis: 10000 });
const exporter = {
  export(spans, done) {
    otlp.export(spans, (result) => {
      spanExports.push(result.code === 0 ? 'SUCCESS' : 'FAILURE');
      if (result.code !== 0) process.stderr.write(`export failed: ${result.error}\n`);
      done(result);
    });
  },
  shutdown: () => otlp.shutdown(),
  forceFlush: () => otlp.forceFlush(),
};
const recorder = {
  onStart() {},
  onEnd(span) {
    const ctx = span.spanContext();
    ended.push({ trace_id: ctx.traceId, span_id: ctx.spanId, name: span.name });
  },
  forceFlush: async () => {},
  shutdown: async () => {},
};
const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({
    'service.name': `dialect-vercel-${mode}`,
    'deployment.environment': 'dialect-test',
  }),
  spanProcessors: [recorder, new BatchSpanProcessor(exporter)],
});
context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
trace.setGlobalTracerProvider(provider);
registerTelemetry(mode === 'genai' ? new OpenTelemetry() : new LegacyOpenTelemetry());

const openai = createOpenAI({ baseURL: llmBaseUrl, apiKey: 'sk-fake' });
const tools = {
  get_weather: tool({
    description: 'Current weather for a city.',
    inputSchema: z.object({ city: z.string().describe('City name') }),
    execute: async ({ city }) => (city.toLowerCase() === 'paris' ? TOOL_RESULT : `no data for ${city}`),
  }),
};

async function runAgent(modelId) {
  const result = await generateText({
    model: openai.chat(modelId),
    prompt: TASK,
    tools,
    stopWhen: isStepCount(3),
    maxRetries: 0,
    experimental_telemetry: { isEnabled: true, functionId: 'weather-agent' },
  });
  return result.text;
}

const scenarios = {};
async function scenario(name, fn, expectError) {
  const mark = ended.length;
  const info = { error: null, output: null };
  try {
    info.output = await fn();
  } catch (err) {
    info.error = `${err?.name ?? 'Error'}: ${err?.message ?? err}`;
    if (!expectError) info.traceback = String(err?.stack ?? err);
  }
  const spans = ended.slice(mark);
  info.trace_ids = [...new Set(spans.map((s) => s.trace_id))].sort();
  info.spans = spans;
  scenarios[name] = info;
}

await scenario('ok', () => runAgent(model), false);
await scenario('error', () => runAgent(errorModel), true);
await provider.forceFlush();
await provider.shutdown();
process.stdout.write(JSON.stringify({ scenarios, span_exports: spanExports, log_exports: [] }) + '\n');
