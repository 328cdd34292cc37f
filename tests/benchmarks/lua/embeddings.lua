-- The same embeddings body on every request: once warm, every request is a cache hit.
local common = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

function init(args)
   common.post("/v1/embeddings", "embeddings", common.options(args))
end
