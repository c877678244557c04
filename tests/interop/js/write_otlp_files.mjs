// Writes agent runs as OTLP trace files with the OpenTelemetry JS SDK's own encoders (@opentelemetry/otlp-transformer,
// the serializers its OTLP exporters send with): OTLP JSON (hex ids, as the spec's JSON encoding and the Collector's
// file exporter write it) or OTLP protobuf (ExportTraceServiceRequest bytes).
//
// Used by the file-import tests (tests/test_sources_files.py) and the autoloop test.
//
//   node write_otlp_files.mjs --out DIR --runs '[{"fail": true}, {"fail": false}]' [--format json|jsonl|protobuf]
//
// Each run: an `invoke_agent support` root span (OTel GenAI attributes, the task as gen_ai.input.messages) with an
// `execute_tool lookup_order` child; a failing run's tool raises (exception event, ERROR status) and so does its root.
// json / protobuf: one file per run, run-<i>.json / run-<i>.binpb; jsonl: every run as one line of runs.jsonl.
// stdout: one JSON object {"files": [...], "traces": [trace id per run, lowercase hex]}.

import { writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

import { context, SpanStatusCode, trace } from '@opentelemetry/api';
import { JsonTraceSerializer, ProtobufTraceSerializer } from '@opentelemetry/otlp-transformer';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';

const { values: args } = parseArgs({
  options: { out: { type: 'string' }, runs: { type: 'string' }, format: { type: 'string', default: 'json' },
             service: { type: 'string', default: 'support-agent' } },
});
if (!args.out || !args.runs || !['json', 'jsonl', 'protobuf'].includes(args.format)) {
  process.stderr.write('usage: node write_otlp_files.mjs --out DIR --runs JSON [--format json|jsonl|protobuf]\n');
  process.exit(2);
}
mkdirSync(args.out, { recursive: true });
const runs = JSON.parse(args.runs);
const memory = new InMemorySpanExporter();
const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({ 'service.name': args.service }),
  spanProcessors: [new SimpleSpanProcessor(memory)],
});
const tracer = provider.getTracer('write-otlp-files', '1.0.0');

const files = [];
const traces = [];
const lines = [];
runs.forEach((run, i) => {
  memory.reset();
  const task = run.task ?? `Where is order A-${1000 + i}?`;
  const root = tracer.startSpan('invoke_agent support', { attributes: {
    'gen_ai.operation.name': 'invoke_agent', 'gen_ai.agent.name': 'support',
    'gen_ai.input.messages': JSON.stringify([{ role: 'user', parts: [{ type: 'text', content: task }] }]) } });
  traces.push(root.spanContext().traceId);
  {
    // The parent is passed explicitly: no context manager is registered in this script.
    const tool = tracer.startSpan('execute_tool lookup_order', { attributes: {
      'gen_ai.operation.name': 'execute_tool', 'gen_ai.tool.name': 'lookup_order', 'gen_ai.tool.call.id': `call_${i}`,
      'gen_ai.tool.call.arguments': JSON.stringify({ order_id: `A-${1000 + i}` }) } },
      trace.setSpan(context.active(), root));
    if (run.fail) {
      tool.recordException({ name: 'ConnectionError', message: 'order database unreachable' });
      tool.setStatus({ code: SpanStatusCode.ERROR, message: 'order database unreachable' });
    } else {
      tool.setAttribute('gen_ai.tool.call.result', JSON.stringify({ status: 'shipped' }));
    }
    tool.end();
  }
  if (run.fail) {
    root.recordException({ name: 'ConnectionError', message: 'order database unreachable' });
    root.setStatus({ code: SpanStatusCode.ERROR, message: 'tool lookup_order failed' });
  } else {
    root.setAttribute('gen_ai.output.messages', JSON.stringify([{ role: 'assistant', finish_reason: 'stop',
      parts: [{ type: 'text', content: `Order A-${1000 + i} has shipped.` }] }]));
  }
  root.end();
  const spans = memory.getFinishedSpans();
  if (args.format === 'protobuf') {
    const path = join(args.out, `run-${i}.binpb`);
    writeFileSync(path, ProtobufTraceSerializer.serializeRequest(spans));
    files.push(path);
  } else {
    const text = Buffer.from(JsonTraceSerializer.serializeRequest(spans)).toString('utf8');
    if (args.format === 'jsonl') {
      lines.push(text);
    } else {
      const path = join(args.out, `run-${i}.json`);
      writeFileSync(path, text);
      files.push(path);
    }
  }
});
if (args.format === 'jsonl') {
  const path = join(args.out, 'runs.jsonl');
  writeFileSync(path, lines.join('\n') + '\n');
  files.push(path);
}
await provider.shutdown();
process.stdout.write(JSON.stringify({ files, traces }) + '\n');
