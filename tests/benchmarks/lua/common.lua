-- Shared by the workload scripts. Request bodies live in ../bodies so the runner warms the cache with
-- exactly the bytes wrk sends.
local common = {}

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"

function common.read_body(name)
   local file = assert(io.open(here .. "../bodies/" .. name .. ".json", "rb"))
   local body = file:read("*a")
   file:close()
   return body
end

function common.post(path, body_name)
   wrk.method = "POST"
   wrk.path = path
   wrk.headers["Content-Type"] = "application/json"
   wrk.headers["Authorization"] = "Bearer sk-bench"
   if body_name then
      wrk.body = common.read_body(body_name)
   end
end

return common
