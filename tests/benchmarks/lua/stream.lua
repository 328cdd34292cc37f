-- The same chat body with "stream": true on every request: once warm, every request replays SSE events.
local common = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

function init(args)
   common.post("/v1/chat/completions", "chat_stream", common.options(args))
end
