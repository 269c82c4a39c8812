-- Gives REST error responses the public API's shape:
--   {"success": false, "status": N, "error": {"message", "type", "code", "details"}}
-- The service computes that body itself (server/api/error_mapping.py, the one place errors
-- are mapped) and sends it as the `x-modelservice-error` trailer of a failed call; for a
-- call that fails before any response the transcoder hands it over as a response header.
-- Native gRPC responses pass untouched (their clients read google.rpc.Status details).

local ERROR_HEADER = "x-modelservice-error"
local STATUS_HEADER = "x-modelservice-http-status"
local REST_MARKER = "x-modelservice-rest"

-- Marks REST requests before the transcoder turns them into gRPC ones, so that the
-- local reply mapper (envoy.yaml) shapes only their errors. A client cannot forge the
-- marker to change anything but the shape of its own error replies.
function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local content_type = headers:get("content-type") or ""
  if string.find(content_type, "application/grpc", 1, true) == 1 then
    headers:remove(REST_MARKER)
  else
    headers:replace(REST_MARKER, "1")
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
