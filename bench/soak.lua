-- Steady mixed load for bench/soak.py: sync, async and failing calls, paced per
-- connection (wrk's delay hook) and counted by status, so unexpected answers show.
-- Env: MTP_TOKEN (bearer), SOAK_DELAY_MS (pause between a connection's requests, 0 = flat out).
local token = os.getenv("MTP_TOKEN")
local pause = tonumber(os.getenv("SOAK_DELAY_MS") or "0")
local threads = {}

-- 20 slots: 17 sync, 1 async, 2 failing (5% async, 10% failing)
local plan = {}
for i = 1, 17 do plan[#plan + 1] = "/services/echo" end
plan[#plan + 1] = "/services/echo?mode=async"
plan[#plan + 1] = "/services/broken"
plan[#plan + 1] = "/services/broken"

-- Answers interleave across a thread's connections, so each answer says what it is:
-- expected are a sync result, an accepted job and the failing service's 500.
local function expected(status, resp)
  if status == 200 then return resp:find('"echo"', 1, true) ~= nil end
  if status == 202 then return resp:find('"job_id"', 1, true) ~= nil end
  if status == 500 then return resp:find("service-error", 1, true) ~= nil end
  return false
end

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  n = 0
  expected_ok, unexpected, statuses = 0, 0, {}
  headers = {["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}
  body = '{"soak": true}'
end

function request()
  n = n + 1
  return wrk.format("POST", plan[(n % #plan) + 1], headers, body)
end

function response(status, hdrs, resp)
  statuses[status] = (statuses[status] or 0) + 1
  if expected(status, resp) then expected_ok = expected_ok + 1 else unexpected = unexpected + 1 end
end

function delay()
  return pause
end

function done(summary, latency, requests)
  local ok, bad, seen = 0, 0, {}
  for _, t in ipairs(threads) do
    ok = ok + t:get("expected_ok")
    bad = bad + t:get("unexpected")
    for s, c in pairs(t:get("statuses")) do seen[s] = (seen[s] or 0) + c end
  end
  local parts = {}
  for s, c in pairs(seen) do parts[#parts + 1] = s .. "=" .. c end
  io.write(string.format("SOAK requests=%d expected=%d unexpected=%d errors=%d " ..
    "p50_ms=%.2f p99_ms=%.2f max_ms=%.2f rps=%.1f statuses=%s\n",
    summary.requests, ok, bad,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
    summary.requests / (summary.duration / 1e6), table.concat(parts, ",")))
end
