-- wrk script for bench.wrk_compare: one chat-completion POST, repeated.
--
-- Configured through the environment (wrk's LuaJIT can read it; wrk has no script arguments
-- before `--`, and this keeps one script for every scenario):
--   BENCH_API_KEY  sent as "Authorization: Bearer ..." (the mock checks it when hit directly;
--                  the proxy drops the client's credential and injects its own key)
--   BENCH_STREAM   "1" for a streamed ("stream": true) request
--   BENCH_CHUNKS   x-mock-chunks for streamed requests (stream events per response)
--
-- done() prints one machine-readable line, "BENCH_RESULT {json}", with the totals and the latency
-- percentiles in microseconds. For a stream, wrk's latency is the time to the END of the response
-- (wrk cannot time the first byte).

local stream = os.getenv("BENCH_STREAM") == "1"
local chunks = os.getenv("BENCH_CHUNKS") or "50"
local api_key = os.getenv("BENCH_API_KEY") or "bench-upstream-key"

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. api_key
if stream then
  wrk.headers["Accept"] = "text/event-stream"
  wrk.headers["x-mock-chunks"] = chunks
end
wrk.body = '{"model":"glm-4.6","stream":' .. (stream and "true" or "false")
  .. ',"messages":[{"role":"user","content":"Say hello in one short sentence."}]}'

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"min":%.1f,"mean":%.1f,"max":%.1f,"stdev":%.1f,'
      .. '"p50":%.1f,"p75":%.1f,"p90":%.1f,"p99":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max, latency.stdev,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99)))
end
