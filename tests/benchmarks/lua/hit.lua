-- The same chat completion body on every request: once warm, every request is a cache hit.
local common = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

function init(args)
   common.post("/v1/chat/completions", "chat", common.options(args))
end
