-- Steady mixed load for bench/soak.py: sync, async and failing calls at a fixed rate,
-- counted by status, so unexpected answers show.
-- Env: MTP_TOKEN (bearer), SOAK_THREAD_RPS (requests per second per wrk thread, 0 = flat out).
-- Pacing: each request takes the thread's next send slot (wrk's delay hook, wall clock
-- through LuaJIT's ffi), so the rate holds whatever the latency; a thread that falls
-- behind does not burst to catch up.
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_usec; } mtp_timeval;
int gettimeofday(mtp_timeval *tv, void *tz);
]]
local tv = ffi.new("mtp_timeval")
local function now_ms()
  ffi.C.gettimeofday(tv, nil)
  return tonumber(tv.tv_sec) * 1000 + tonumber(tv.tv_usec) / 1000
end

local token = os.getenv("MTP_TOKEN")
local thread_rps = tonumber(os.getenv("SOAK_THREAD_RPS") or "0")
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
  interval = thread_rps > 0 and 1000 / thread_rps or 0
  next_slot = 0
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
  if interval == 0 then return 0 end
  local now = now_ms()
  local slot = math.max(next_slot, now)
  next_slot = slot + interval
  return slot - now
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
