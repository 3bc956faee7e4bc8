--- The counters the runtime keeps for squall.metrics' built-in metrics:
-- plain numbers in one table, bumped where things happen (a connection
-- accepted, a handler that raised), so keeping them costs a table store.
-- Bytes read and written are counted in C (core.io_bytes). squall.metrics
-- reads these when scraped, and sets `rpc_observe` to time RPC calls.
-- @module squall.stats
return {
  connections_accepted = 0, -- TCPServer connections accepted
  connections_open = 0,     -- TCPServer connections whose handler still runs
  handler_errors = 0,       -- handle_stream (and RPC handlers) that raised
  --- function(method, seconds, failed), or nil when nobody watches
  rpc_observe = nil,
}
