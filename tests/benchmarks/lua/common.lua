-- Shared by the workload scripts. Request bodies live in ../bodies so the runner warms the cache with
-- exactly the bytes wrk sends. Arguments after "--" are key=value options: prefix=/openai goes before every
-- path and bodies=NAME reads the bodies from ../bodies/NAME/ (a peer that speaks its own dialect of the API);
-- miss.lua also takes nonce=X.
local common = {}

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"

function common.options(args)
   local options = {}
   for _, arg in ipairs(args or {}) do
      local key, value = arg:match("^([%w_]+)=(.*)$")
      if key then
         options[key] = value
      end
   end
   return options
end

function common.read_body(name, options)
   local dir = options and options.bodies and (options.bodies .. "/") or ""
   local file = assert(io.open(here .. "../bodies/" .. dir .. name .. ".json", "rb"))
   local body = file:read("*a")
   file:close()
   return body
end

-- Called from init(args): wrk formats its request after init, so what is set here is what it sends.
function common.post(path, body_name, options)
   wrk.method = "POST"
   wrk.path = (options.prefix or "") .. path
   wrk.headers["Content-Type"] = "application/json"
   wrk.headers["Authorization"] = "Bearer sk-bench"
   if body_name then
      wrk.body = common.read_body(body_name, options)
   end
end

return common
