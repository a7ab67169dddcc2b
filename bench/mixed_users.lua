-- wrk script: every request is sent as the next of many users, round-robin.
--
--   wrk -t2 -c64 -d5s -s bench/mixed_users.lua http://127.0.0.1:PORT/api/fixed?n=1024 \
--       -- /path/to/cookies.txt 2
--
-- cookies.txt holds one `gate_session` cookie value per line (bench.py writes it); the second
-- argument is wrk's thread count (-t), default 1. Each thread walks the whole list, starting at
-- its own offset (thread k of n starts at user k*N/n), so all users are hit at the same rate. Requests are formatted once in init(): the per-request cost in
-- wrk is the same as for a fixed request. No response() hook (it would make wrk hand every body
-- to Lua): unpaid users' 402 answers show up in wrk's "Non-2xx or 3xx responses" count.

local thread_count = 0

function setup(thread)
   thread:set("thread_index", thread_count)
   thread_count = thread_count + 1
end

function init(args)
   local path = args[1]
   if path == nil then
      error("usage: wrk ... -s mixed_users.lua URL -- COOKIES_FILE [THREADS]")
   end
   local cookies = {}
   for line in io.lines(path) do
      if line ~= "" then
         cookies[#cookies + 1] = line
      end
   end
   if #cookies == 0 then
      error("no cookies in " .. path)
   end
   requests = {}
   for i, cookie in ipairs(cookies) do
      local headers = {}
      for name, value in pairs(wrk.headers) do
         headers[name] = value
      end
      headers["Cookie"] = "gate_session=" .. cookie
      requests[i] = wrk.format(nil, nil, headers)
   end
   local threads = tonumber(args[2] or "1")
   -- request() increments before use: thread k starts at user k*N/threads (1-based: +1).
   next_index = math.floor(thread_index * #requests / threads)
end

function request()
   next_index = next_index % #requests + 1
   return requests[next_index]
end
