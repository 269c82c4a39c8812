-- Gives REST error responses the public API's shape:
--   {"success": false, "status": N, "error": {"message", "type", "code", "details"}}
-- The service computes that body itself (server/api/error_mapping.py, the one place errors
-- are mapped) and sends it as the `x-modelservice-error` trailer of a failed call; for a
-- call that fails before any response the transcoder hands it over as a response header.
-- Native gRPC responses pass untouched (their clients read google.rpc.Status details).

local ERROR_HEADER = "x-modelservice-error"
local STATUS_HEADER = "x-modelservice-http-status"
local REST_MARKER = "x-modelservice-rest"

-- Path fields of the REST routes, each with the path pattern that binds it. The
-- transcoder lets a query parameter of the same name replace the path's value; a REST
-- request naming one of them in its query is refused instead.
local PATH_FIELDS = {
  { name = "namespace_id", pattern = "^/v1/namespaces/[^/]+" },
  { name = "model_id", pattern = "^/v1/namespaces/[^/]+/models/[^/]+" },
  { name = "task_id", pattern = "^/v1/namespaces/[^/]+/deploy_tasks/[^/]+" },
  { name = "task_id", pattern = "^/v1/namespaces/[^/]+/delete_tasks/[^/]+" },
  { name = "model_name", pattern = "^/v1/namespaces/[^/]+/aliases/[^/]+" },
  { name = "alias", pattern = "^/v1/namespaces/[^/]+/aliases/[^/]+/[^/]+" },
  -- The seeds' own routes (seed 004, seed 003).
  { name = "task_id", pattern = "^/deploy/[^/]+" },
  { name = "task_id", pattern = "^/delete/[^/]+" },
  { name = "model_id", pattern = "^/deploy%-status/[^/]+" },
  { name = "model_id", pattern = "^/delete%-status/[^/]+" },
  { name = "model_id", pattern = "^/_plugins/_ml/models/[^/]+" },
  { name = "task_id", pattern = "^/_plugins/_ml/tasks/[^/]+" },
}

local function url_decode(text)
  text = string.gsub(text, "+", " ")
  return (string.gsub(text, "%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

local function shaped_error(status, message, error_type, code)
  return string.format(
    '{"success":false,"status":%d,"error":{"message":"%s","type":"%s","code":"%s","details":{}}}',
    status, message, error_type, code)
end

-- Whether `text` is valid UTF-8 as protobuf checks it (no overlong forms, no surrogates).
-- Path and query values become string fields; invalid UTF-8 would fail in the service's
-- gRPC layer, before any handler could answer in the public error shape.
local function valid_utf8(text)
  local i, n = 1, #text
  while i <= n do
    local c = string.byte(text, i)
    local length, low, high = 1, 0x80, 0xBF
    if c < 0x80 then
      length = 1
    elseif c >= 0xC2 and c <= 0xDF then
      length = 2
    elseif c >= 0xE0 and c <= 0xEF then
      length = 3
      if c == 0xE0 then low = 0xA0 elseif c == 0xED then high = 0x9F end
    elseif c >= 0xF0 and c <= 0xF4 then
      length = 4
      if c == 0xF0 then low = 0x90 elseif c == 0xF4 then high = 0x8F end
    else
      return false
    end
    for j = i + 1, i + length - 1 do
      local d = string.byte(text, j)
      if d == nil then return false end
      if j == i + 1 then
        if d < low or d > high then return false end
      elseif d < 0x80 or d > 0xBF then
        return false
      end
    end
    i = i + length
  end
  return true
end

-- The path field a query parameter would override, or nil.
local function overridden_path_field(path)
  local route, query = string.match(path, "^([^?]*)%?(.*)$")
  if query == nil then
    return nil
  end
  for pair in string.gmatch(query, "[^&]+") do
    local key = string.lower(url_decode(string.match(pair, "^[^=]*")))
    for _, field in ipairs(PATH_FIELDS) do
      local bound = string.find(route, field.pattern) ~= nil
      if bound and (key == field.name or string.find(key, field.name .. ".", 1, true) == 1) then
        return field.name
      end
    end
  end
  return nil
end

-- Marks REST requests before the transcoder turns them into gRPC ones, so that the
-- local reply mapper (envoy.yaml) shapes only their errors. A client cannot forge the
-- marker to change anything but the shape of its own error replies.
function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local content_type = headers:get("content-type") or ""
  if string.find(content_type, "application/grpc", 1, true) == 1 then
    headers:remove(REST_MARKER)
    return
  end
  headers:replace(REST_MARKER, "1")
  local path = headers:get(":path") or ""
  if not valid_utf8(url_decode(path)) then
    request_handle:respond(
      { [":status"] = "400", ["content-type"] = "application/json" },
      shaped_error(400, "the path or query is not valid UTF-8 once percent-decoded",
        "ValidationError", "malformed_request"))
    return
  end
  local field = overridden_path_field(path)
  if field ~= nil then
    request_handle:respond(
      { [":status"] = "400", ["content-type"] = "application/json" },
      shaped_error(400, field .. " is part of the path and cannot be given as a query parameter",
        "ValidationError", "path_field_in_query"))
  end
end

function envoy_on_response(response_handle)
  local headers = response_handle:headers()
  local content_type = headers:get("content-type") or ""
  if string.find(content_type, "application/grpc", 1, true) == 1 then
    return
  end
  -- A successful call whose REST status is not 200 (the public API answers a failed
  -- deployment with 500 and the deploy response as body).
  local override = headers:get(STATUS_HEADER)
  if override ~= nil then
    headers:remove(STATUS_HEADER)
    headers:replace(":status", override)
  end
  local shaped = headers:get(ERROR_HEADER)
  if shaped == nil then
    return
  end
  headers:remove(ERROR_HEADER)
  local status = string.match(shaped, '"status":%s*(%d+)')
  if status ~= nil then
    headers:replace(":status", status)
  end
  headers:replace("content-type", "application/json")
  response_handle:body(true):setBytes(shaped)
end
