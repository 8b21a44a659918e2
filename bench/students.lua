-- wrk script for every line of bench/run.py: each request carries an
-- X-Student-Id picked at random from BENCH_STUDENTS ids (default 1000), so the
-- enforced route sees many students, not one hot key. The requests are built
-- once in init(); request() only picks one, so wrk's own cost stays the same
-- for every line.

local requests = {}
local count = tonumber(os.getenv("BENCH_STUDENTS") or "1000")
local prefix = os.getenv("BENCH_STUDENT_PREFIX") or "bench-student-"

function init(args)
   math.randomseed(os.time())
   for i = 1, count do
      local headers = {}
      headers["X-Student-Id"] = string.format("%s%05d", prefix, i)
      requests[i] = wrk.format("GET", nil, headers)
   end
end

function request()
   return requests[math.random(count)]
end
