// Sends spans to an OTLP/HTTP endpoint with the OpenTelemetry JS SDK's own exporter and prints what it did as JSON.
//
// Used by tests/test_interop_js.py. The exporter is @opentelemetry/exporter-trace-otlp-http, which sends OTLP/JSON
// (its Node OTLPTraceExporter sets `Content-Type: application/json`; protobuf needs the separate
// exporter-trace-otlp-proto package).
//
//   node send_spans.mjs --url http://127.0.0.1:4319/v1/traces [--traces 3] [--spans-per-trace 4]
//                       [--compression none|gzip] [--processor batch|simple] [--token TOKEN]
//                       [--timeout-ms 30000]
// TLS: the exporter's standard variables, OTEL_EXPORTER_OTLP_CERTIFICATE / _CLIENT_CERTIFICATE / _CLIENT_KEY.
//
// stdout: one JSON object
//   {"spans": [{"traceId", "spanId", "parentSpanId", "name"}...],   every span created, ids as lowercase hex
//    "exports": [{"code": 0|1, "error": str|null, "spans": n}...],  every ExportResult the exporter returned
//    "requests": [{"method", "path", "contentType", "contentEncoding", "status"}...],   every HTTP request the
//                                                                   process made, seen via node:diagnostics_channel
//    "flushError": str|null}                                        why forceFlush/shutdown rejected, if they did
// Exit code 0 when every export succeeded, 1 otherwise, 2 on bad arguments.

import diagnostics_channel from 'node:diagnostics_channel';
import { parseArgs } from 'node:util';

import { context, SpanKind, SpanStatusCode, trace } from '@opentelemetry/api';
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-http';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { BasicTracerProvider, BatchSpanProcessor, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    traces: { type: 'string', default: '3' },
    'spans-per-trace': { type: 'string', default: '4' },
    compression: { type: 'string', default: 'none' },
    processor: { type: 'string', default: 'batch' },
    token: { type: 'string' },
    'timeout-ms': { type: 'string', default: '30000' },
  },
});
if (!args.url || !['none', 'gzip'].includes(args.compression) || !['batch', 'simple'].includes(args.processor)) {
  process.stderr.write('usage: node send_spans.mjs --url URL [--traces N] [--spans-per-trace N] ' +
    '[--compression none|gzip] [--processor batch|simple] [--token TOKEN]\n');
  process.exit(2);
}
const nTraces = Number(args.traces);
const spansPerTrace = Number(args['spans-per-trace']);

// What actually went over the wire: every outgoing http.ClientRequest and the status of its response.
const requests = [];
const byRequest = new Map();
diagnostics_channel.subscribe('http.client.request.start', ({ request }) => {
  const entry = {
    method: request.method,
    path: request.path,
    contentType: request.getHeader('content-type') ?? null,
    contentEncoding: request.getHeader('content-encoding') ?? null,
    status: null,
  };
  requests.push(entry);
  byRequest.set(request, entry);
});
diagnostics_channel.subscribe('http.client.response.finish', ({ request, response }) => {
  const entry = byRequest.get(request);
  if (entry) entry.status = response.statusCode;
});

// The real exporter, wrapped only to record the ExportResult of each call (processors swallow it otherwise).
const exporter = new OTLPTraceExporter({
  url: args.url,
  compression: args.compression,
  headers: args.token ? { Authorization: `Bearer ${args.token}` } : {},
  timeoutMillis: Number(args['timeout-ms']),
});
const exports = [];
const recordingExporter = {
  export(spans, resultCallback) {
    exporter.export(spans, (result) => {
      exports.push({ code: result.code, error: result.error ? String(result.error) : null, spans: spans.length });
      resultCallback(result);
    });
  },
  shutdown: () => exporter.shutdown(),
  forceFlush: () => exporter.forceFlush(),
};

const processor = args.processor === 'batch'
  ? new BatchSpanProcessor(recordingExporter, { maxExportBatchSize: 5, scheduledDelayMillis: 100 })
  : new SimpleSpanProcessor(recordingExporter);
const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({
    'service.name': 'interop-js-agent',
    'service.version': '1.2.3',
    'deployment.environment.name': 'test',
  }),
  spanProcessors: [processor],
});
const tracer = provider.getTracer('interop-js', '0.1.0');

const created = [];
function remember(span, name, parent) {
  const ctx = span.spanContext();
  created.push({ traceId: ctx.traceId, spanId: ctx.spanId, parentSpanId: parent ? parent.spanContext().spanId : '', name });
}

// Each trace: an agent root span with LLM-call children, each LLM call with a tool-call child, until the trace has
// --spans-per-trace spans; GenAI semantic-convention attributes, events, and an error status on the first tool call
// of every trace. No context manager is registered, so parents are passed explicitly through a Context.
for (let t = 0; t < nTraces; t++) {
  const rootName = `invoke_agent planner-${t}`;
  const root = tracer.startSpan(rootName, {
    kind: SpanKind.SERVER,
    attributes: { 'gen_ai.operation.name': 'invoke_agent', 'gen_ai.agent.name': 'planner', 'trace.index': t },
  });
  remember(root, rootName, null);
  const rootCtx = trace.setSpan(context.active(), root);
  let count = 1;
  let firstTool = true;
  while (count < spansPerTrace) {
    const chatName = `chat gpt-4o step-${count}`;
    const chat = tracer.startSpan(chatName, {
      kind: SpanKind.CLIENT,
      attributes: {
        'gen_ai.operation.name': 'chat',
        'gen_ai.request.model': 'gpt-4o',
        'gen_ai.usage.input_tokens': 100 + count,
        'gen_ai.usage.output_tokens': 20 + count,
        'gen_ai.request.temperature': 0.2,
      },
    }, rootCtx);
    remember(chat, chatName, root);
    chat.addEvent('gen_ai.content.prompt', { 'gen_ai.prompt': `step ${count} of trace ${t}: ünïcødé ✓` });
    count++;
    if (count < spansPerTrace) {
      const toolName = `execute_tool search step-${count}`;
      const tool = tracer.startSpan(toolName, {
        kind: SpanKind.INTERNAL,
        attributes: { 'gen_ai.operation.name': 'execute_tool', 'gen_ai.tool.name': 'search',
          'gen_ai.tool.call.id': `call-${t}-${count}` },
      }, trace.setSpan(rootCtx, chat));
      remember(tool, toolName, chat);
      if (firstTool) {
        tool.setStatus({ code: SpanStatusCode.ERROR, message: 'tool timed out' });
        tool.recordException(new Error('search backend timed out'));
        firstTool = false;
      }
      tool.end();
      count++;
    }
    chat.end();
  }
  root.end();
}

// SimpleSpanProcessor's forceFlush rejects when an export failed; report it instead of crashing, the caller decides.
let flushError = null;
try {
  await provider.forceFlush();
} catch (err) {
  flushError = String(err);
}
try {
  await provider.shutdown();
} catch (err) {
  flushError = flushError ?? String(err);
}

process.stdout.write(JSON.stringify({ spans: created, exports, requests, flushError }) + '\n');
process.exit(exports.length > 0 && exports.every((e) => e.code === 0) && flushError === null ? 0 : 1);
