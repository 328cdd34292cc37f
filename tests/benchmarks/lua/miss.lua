-- A different chat body on every request: "<nonce>.<thread>-<n> " opens the last message's content.
-- Pass a nonce unique to the run (wrk ... -- nonce=<nonce>) so no earlier run has cached these bodies.
local common = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local threads = 0
local head, tail = "", ""
local nonce = "run"
local n = 0

function setup(thread)
   threads = threads + 1
   thread:set("thread_no", threads)
end

function init(args)
   local options = common.options(args)
   common.post("/v1/chat/completions", nil, options)
   local body = common.read_body("chat", options)
   local marker = '"content":"'
   local cut = nil
   local from = 1
   while true do
      local found = body:find(marker, from, true)
      if not found then break end
      cut = found + #marker
      from = found + 1
   end
   head, tail = body:sub(1, cut - 1), body:sub(cut)
   nonce = (options.nonce or tostring(os.time())) .. "." .. tostring(thread_no or 1)
end

function request()
   n = n + 1
   return wrk.format(nil, nil, nil, head .. nonce .. "-" .. n .. " " .. tail)
end
