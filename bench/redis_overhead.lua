-- One path, POSTed flat out (bench/redis_overhead.py): counts answers that are not a
-- sync result (200 with "echo") or an accepted job (202).
-- Env: MTP_TOKEN, BENCH_PATH.
local token = os.getenv("MTP_TOKEN")
local path = os.getenv("BENCH_PATH")
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  ok, bad, accepted = 0, 0, 0
  headers = {["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}
end

function request()
  return wrk.format("POST", path, headers, '{"bench": true}')
end

function response(status, hdrs, body)
  if status == 202 then
    accepted = accepted + 1
    ok = ok + 1
  elseif status == 200 and body:find('"echo"', 1, true) then
    ok = ok + 1
  else
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local good, wrong, acc = 0, 0, 0
  for _, t in ipairs(threads) do
    good = good + t:get("ok")
    wrong = wrong + t:get("bad")
    acc = acc + t:get("accepted")
  end
  io.write(string.format("RESULT rps=%.1f p50_ms=%.2f p99_ms=%.2f expected=%d unexpected=%d " ..
    "accepted=%d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, good, wrong, acc))
end
