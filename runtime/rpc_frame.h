/* rpc_frame.h: MessagePack-RPC messages out of an unpacker, for squall.rpc.
 *
 * core.rpc_frame_reader() -> next_message, a function of an unpacker
 * (squall.msgpack.unpacker; msgpack must be set up first) that takes the
 * next whole value and says what it is, without a table for the message
 * or its parameters:
 *
 *   nil                     the next value is not whole yet
 *   nil, err                the input is not MessagePack (kind msgpack);
 *                           the unpacker stays broken
 *   REQUEST, msgid, method, nparams, params...
 *   NOTIFY,  nil,   method, nparams, params...
 *   RESPONSE, msgid, error, result
 *   OTHER, value            anything else: not an RPC message
 *
 * The kinds are the message types of the MessagePack-RPC specification
 * ([0, msgid, method, params], [1, msgid, error, result], [2, method,
 * params]); msgid and method are what the peer sent, of any type, for
 * squall.rpc to check. nparams counts the params that follow, MessagePack
 * nil as nil, or is PARAMS_TABLE (then one table follows: more than
 * RPC_FRAME_MAX_SPREAD params) or PARAMS_NOT_ARRAY (nothing follows: the
 * params are not an array). core.rpc_frame_constants holds these names
 * and values for Lua.
 */
#ifndef SQUALL_RPC_FRAME_H
#define SQUALL_RPC_FRAME_H

#include <lua.h>

enum rpc_frame_kind {
  RPC_FRAME_REQUEST = 0,
  RPC_FRAME_RESPONSE = 1,
  RPC_FRAME_NOTIFY = 2,
  RPC_FRAME_OTHER = -1,
};

enum rpc_frame_params {
  RPC_FRAME_PARAMS_TABLE = -1,
  RPC_FRAME_PARAMS_NOT_ARRAY = -2,
};

/* More parameters than this come as one table. */
#define RPC_FRAME_MAX_SPREAD 64

/* Add core.rpc_frame_reader and core.rpc_frame_constants. */
int squall_rpc_frame_open(lua_State *L);

#endif
