"""The Lua script that takes messages: popped and recorded as unacknowledged in one step.

kombu pops an entry (``BRPOP``) and records it in its ``unacked`` hash in a second round
trip: a worker or a connection that dies between the two loses the message. ``TAKE``
does both inside Redis, atomically, for up to ``limit`` entries of the candidate lists
(in the order given: priorities first, then kombu's queue cycle), and writes kombu's own
formats, so stock workers can acknowledge, restore and sweep what it recorded:

- ``unacked`` (hash): delivery tag -> ``[<entry as it came>, exchange, routing_key]``,
  built by concatenation: the entry is never decoded and encoded again (cjson would
  round numbers), only the two strings are encoded;
- ``unacked_index`` (sorted set): delivery tag -> the time it was taken.

The script records only what the worker's envelope check (``_intake/envelope.py``) and
kombu's restore accept, read as Python's ``json`` reads it: a record kombu cannot
restore was dropped by the sweep (lost) and one Python cannot parse stopped every sweep,
stock workers' too. So the decoder refuses lua-cjson's "invalid numbers" (``0x10``,
``inf``...), control characters inside strings and depth beyond the envelope's, and
tells an empty array from an empty object.

How often a message was delivered travels in the message (``properties``,
``DELIVERIES_PROPERTY``): the visibility sweep and a requeue add one as they put it
back (``qos.py``), the script returns it plus one. It dies with the message: no
count outlives its message, whichever worker (stock or not) acknowledges it.

A tag already in ``unacked`` (a message restored or replayed while another copy is held)
is recorded under ``<tag>#celerybridge-<sha1>``, so neither copy's record replaces the
other's; the worker acknowledges that alias.

Anything else (larger than a message may be, not UTF-8, not JSON, not an envelope) is
moved as it came to the queue's holding list (``<queue>.dead.held``), and the worker
wraps it as a raw dead letter in Python (``channel.py``, ``records.py``). The size is checked first
(O(1)): a larger entry is not read at all (encoding it in Lua blocked Redis for seconds).
Within the limit, cjson decodes (fast, C); the UTF-8 and control-character scans (Lua
patterns, ~30 ms a MB) run only on entries up to ``SCAN_LIMIT``: a larger one Python
cannot read is caught by the sweep, which dead-letters it.

Keys are passed as ``KEYS`` (with kombu's ``global_keyprefix`` applied by the caller), and
the script is run with ``EVALSHA``, loaded again after ``NOSCRIPT`` (a restarted or
flushed Redis).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import NoScriptError

from ..._constants import DELIVERIES_PROPERTY, SCAN_LIMIT, TAG_ALIAS_SEP
from ..intake.envelope import ENVELOPE_DEPTH

_LUA = r"""
local now, limit, envelope_limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local unacked, index = KEYS[1], KEYS[2]

-- A decoder of our own (cjson.new): the settings below do not change the shared cjson
-- other scripts on this server use. Python's json refuses what lua-cjson calls invalid
-- numbers (0x10, +1, inf, nan): a record kombu's sweep cannot read stops every sweep.
local json = cjson.new()
json.decode_invalid_numbers(false)
json.decode_max_depth(@DEPTH@)

-- Whether the bytes are UTF-8 as Python decodes it (no surrogates, no overlongs):
-- every valid sequence is replaced by one ASCII byte in C (gsub), then any byte left
-- above 127 is invalid. No Lua loop over the entry.
local function utf8_ok(s)
  if not string.find(s, '[\128-\255]') then return true end
  s = string.gsub(s, '[\240][\144-\191][\128-\191][\128-\191]', '.')
  s = string.gsub(s, '[\241-\243][\128-\191][\128-\191][\128-\191]', '.')
  s = string.gsub(s, '[\244][\128-\143][\128-\191][\128-\191]', '.')
  s = string.gsub(s, '[\224][\160-\191][\128-\191]', '.')
  s = string.gsub(s, '[\225-\236\238\239][\128-\191][\128-\191]', '.')
  s = string.gsub(s, '[\237][\128-\159][\128-\191]', '.')
  s = string.gsub(s, '[\194-\223][\128-\191]', '.')
  return not string.find(s, '[\128-\255]')
end

-- Python's json refuses control characters inside strings; cjson reads them. Jumps from
-- quote to backslash to control character (string.find, in C); only entries that have
-- a control character at all are walked.
local function controls_ok(s)
  if not string.find(s, '[%z\1-\31]') then return true end
  local i, inside = 1, false
  while true do
    i = string.find(s, '[%z\1-\31"\\]', i)
    if not i then return true end
    local c = string.byte(s, i)
    if c == 34 then inside = not inside
    elseif c == 92 then i = i + 1
    elseif inside or (c ~= 9 and c ~= 10 and c ~= 13) then return false end
    i = i + 1
  end
end

local function object(v)
  return type(v) == 'table' and v[1] == nil
end

local function optional_string(v)
  return v == nil or v == cjson.null or v == json.null or type(v) == 'string'
end

-- cjson decodes [] and {} alike (an empty table). Where an empty table was found, the
-- entry is decoded again with every empty array made a one-element array, and the same
-- path looked at: kombu's restore writes into headers, so they must be an object.
local function empty_is_array(item, path)
  local ok, doc = pcall(json.decode, (string.gsub(item, '%[(%s*)%]', '[0%1]')))
  if not ok then return true end
  for _, name in ipairs(path) do
    if type(doc) ~= 'table' then return true end
    doc = doc[name]
  end
  return not object(doc)
end

-- The delivery tag, exchange, routing key and prior deliveries of an entry, or nil:
-- nil when Python's envelope check (_intake/envelope.py) or kombu's restore could
-- refuse it. Python then says why, as it dead-letters the entry.
local function check(item)
  local ok, doc = pcall(json.decode, item)
  local readable = item
  if not ok then
    -- Lone surrogates in \u escapes: kombu's JSON reads them, cjson does not. Read the
    -- shape without them (the record keeps the entry as it came).
    local patched, n = string.gsub(item, '\\u[dD][89a-fA-F]%x%x', '\\ufffd')
    if n > 0 then
      ok, doc = pcall(json.decode, patched)
      readable = patched
    end
  end
  if not ok or not object(doc) then return nil end
  -- Lua's pattern scans cost ~30 ns a byte: above @SCAN@ bytes they are left to the
  -- sweep, which dead-letters a record Python cannot read (qos.py).
  if #item <= @SCAN@ and (not utf8_ok(item) or not controls_ok(item)) then return nil end
  local p, headers = doc['properties'], doc['headers']
  if not object(p) or type(p['delivery_tag']) ~= 'string' then return nil end
  local info = p['delivery_info']
  if not object(info) or type(info['exchange']) ~= 'string'
      or type(info['routing_key']) ~= 'string' or not object(headers) then
    return nil
  end
  for _, path in ipairs({{}, {'properties'}, {'properties', 'delivery_info'}, {'headers'}}) do
    local v = doc
    for _, name in ipairs(path) do v = v[name] end
    if next(v) == nil and empty_is_array(readable, path) then return nil end
  end
  if not optional_string(doc['content-type']) or not optional_string(doc['content-encoding'])
      or not optional_string(doc['body']) then
    return nil
  end
  local encoding, body = p['body_encoding'], doc['body']
  if encoding ~= nil and encoding ~= json.null and encoding ~= 'base64' then return nil end
  if encoding == 'base64' and type(body) == 'string' and #body > 0 then
    if #body % 4 ~= 0 or string.find(body, '[^A-Za-z0-9+/=]')
        or string.find(body, '=[^=]') or string.find(body, '===') then
      return nil
    end
  end
  local priority = p['priority']
  if priority ~= nil and priority ~= json.null
      and (type(priority) ~= 'number' or priority ~= math.floor(priority)) then
    return nil
  end
  local prior = p['@DELIVERIES@']
  if type(prior) ~= 'number' or prior < 0 or prior ~= prior then prior = 0 end
  return p['delivery_tag'], info['exchange'], info['routing_key'], math.floor(prior)
end

local taken, held = {}, 0
local candidates = (#KEYS - 2) / 2
for i = 1, candidates do
  local key, hold_key = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  while #taken < limit do
    local item = redis.call('RPOP', key)
    if not item then break end
    -- The size first (O(1)): a larger entry is not read at all.
    local tag, exchange, routing_key, prior
    if #item <= envelope_limit then
      tag, exchange, routing_key, prior = check(item)
    end
    if not tag then
      -- Moved as it came; the worker dead-letters it (base64 in Python, not here).
      held = held + 1
      redis.call('LPUSH', hold_key, item)
    else
      local alias = tag
      local n = 0
      while redis.call('HEXISTS', unacked, alias) == 1 do
        n = n + 1
        alias = tag .. '@ALIAS@' .. redis.sha1hex(tag .. now .. n .. #taken)
      end
      redis.call('HSET', unacked, alias, '[' .. item .. ',' .. cjson.encode(exchange) .. ','
        .. cjson.encode(routing_key) .. ']')
      redis.call('ZADD', index, now, alias)
      taken[#taken + 1] = {i, alias, item, prior + 1}
    end
  end
  if #taken >= limit then break end
end
local more = 0
if #taken >= limit then more = 1 end
return {more, held, taken}
"""

TAKE = (
    _LUA.replace("@DEPTH@", str(ENVELOPE_DEPTH))
    .replace("@SCAN@", str(SCAN_LIMIT))
    .replace("@DELIVERIES@", DELIVERIES_PROPERTY)
    .replace("@ALIAS@", TAG_ALIAS_SEP)
)
"""The take script, with the names of ``_constants``."""

TAKE_SHA = hashlib.sha1(TAKE.encode()).hexdigest()


def take_arguments(
    unacked: str,
    index: str,
    candidates: Sequence[tuple[str, str, str]],
    now: float,
    limit: int,
    envelope_limit: int,
) -> list[Any]:
    """``EVALSHA``'s arguments after the script: key count, keys, argv. ``candidates``
    are ``(list key, holding list key, queue name)``, keys already prefixed."""
    keys = [unacked, index]
    for key, hold_key, _ in candidates:
        keys += [key, hold_key]
    return [len(keys), *keys, repr(now), limit, envelope_limit]


def run_take(client: Any, arguments: Sequence[Any]) -> Any:
    """Run the take script on ``client`` (its own connection, if it holds one), loading
    it when Redis does not have it. The keys in ``arguments`` are prefixed already: the
    call bypasses kombu's prefixing client, which would prefix the first key only."""
    execute: Any = redis.Redis.execute_command
    try:
        return execute(client, "EVALSHA", TAKE_SHA, *arguments)
    except NoScriptError:
        return execute(client, "EVAL", TAKE, *arguments)
