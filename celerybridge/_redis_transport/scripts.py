"""The Lua script that takes messages: popped and recorded as unacknowledged in one step.

kombu pops an entry (``BRPOP``) and records it in its ``unacked`` hash in a second round
trip: a worker or a connection that dies between the two loses the message. ``TAKE``
does both inside Redis, atomically, for up to ``limit`` entries of the candidate lists
(in the order given: priorities first, then kombu's queue cycle), and writes kombu's own
formats, so stock workers can acknowledge, restore and sweep what it recorded:

- ``unacked`` (hash): delivery tag -> ``[<entry as it came>, exchange, routing_key]``,
  built by concatenation: the entry is never decoded and encoded again (cjson would
  round numbers), only the two strings are encoded;
- ``unacked_index`` (sorted set): delivery tag -> the time it was taken;
- ``celerybridge.deliveries`` (hash): delivery tag -> how often it was taken.

A tag already in ``unacked`` (a message restored or replayed while another copy is held)
is recorded under ``<tag>#celerybridge-<sha1>``, so neither copy's record replaces the
other's; the worker acknowledges that alias.

An entry kombu could not record or restore (not UTF-8, not JSON, no string delivery tag,
no exchange and routing key, headers that are not an object, larger than a message may
be) is pushed to ``<queue>.dead`` in the same step, base64 inside a kombu envelope with
the reason (the format of ``_intake/envelope.py``'s ``raw_dead_letter``): it is never
lost, and it never reaches the worker. Everything is checked before anything is written
for an entry: Redis does not roll back a script's earlier writes when it fails.

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

from .._constants import (
    DEAD_FROM_HEADER,
    DEAD_KIND_HEADER,
    DEAD_KIND_RAW,
    DEAD_REASON_HEADER,
    TAG_ALIAS_SEP,
)

_LUA = r"""
local now, limit = ARGV[1], tonumber(ARGV[2])
local envelope_limit, max_bytes = tonumber(ARGV[3]), ARGV[4]
local unacked, index, deliveries = KEYS[1], KEYS[2], KEYS[3]

local function utf8_ok(s)
  local i, n = 1, #s
  while true do
    i = string.find(s, '[\128-\255]', i)
    if not i then return true end
    local c = string.byte(s, i)
    local len
    if c >= 194 and c <= 223 then len = 2
    elseif c >= 224 and c <= 239 then len = 3
    elseif c >= 240 and c <= 244 then len = 4
    else return false end
    if i + len - 1 > n then return false end
    local c2 = string.byte(s, i + 1)
    local lo, hi = 128, 191
    if c == 224 then lo = 160 elseif c == 237 then hi = 159
    elseif c == 240 then lo = 144 elseif c == 244 then hi = 143 end
    if c2 < lo or c2 > hi then return false end
    for k = i + 2, i + len - 1 do
      local b = string.byte(s, k)
      if b < 128 or b > 191 then return false end
    end
    i = i + len
  end
end

local function kind(v)
  if v == nil then return 'missing' end
  if v == cjson.null then return 'null' end
  if type(v) == 'table' then return 'a JSON array or object' end
  return 'a ' .. type(v)
end

-- The delivery tag, exchange and routing key of an entry, or nil and why not.
local function check(item)
  if #item > envelope_limit then
    return nil, nil, nil, 'a raw entry of ' .. #item .. ' bytes, more than a message of '
      .. max_bytes .. ' bytes can take (CELERYBRIDGE_MAX_MESSAGE_BYTES)'
  end
  if not utf8_ok(item) then
    return nil, nil, nil, 'not a kombu message: not UTF-8 JSON (UnicodeDecodeError)'
  end
  local ok, doc = pcall(cjson.decode, item)
  if not ok then
    -- Lone surrogates in \u escapes: kombu's JSON reads them, cjson does not. Read the
    -- shape without them (the record keeps the entry as it came).
    local patched, n = string.gsub(item, '\\u[dD][89a-fA-F]%x%x', '\\ufffd')
    if n > 0 then ok, doc = pcall(cjson.decode, patched) end
  end
  if not ok then
    return nil, nil, nil, 'not a kombu message: not UTF-8 JSON (JSONDecodeError)'
  end
  if type(doc) ~= 'table' or doc[1] ~= nil then
    return nil, nil, nil, 'not a kombu message: a JSON ' .. kind(doc) .. ', not an object'
  end
  local p = doc['properties']
  if type(p) ~= 'table' then
    return nil, nil, nil, "not a kombu message: 'properties' is " .. kind(p) .. ', not an object'
  end
  if type(p['delivery_tag']) ~= 'string' then
    return nil, nil, nil, "not a kombu message: no string 'delivery_tag' in its properties"
  end
  local info = p['delivery_info']
  if type(info) ~= 'table' or type(info['exchange']) ~= 'string'
      or type(info['routing_key']) ~= 'string' then
    return nil, nil, nil,
      "not a kombu message: 'delivery_info' lacks a string exchange and routing key"
  end
  local headers = doc['headers']
  if type(headers) ~= 'table' or headers[1] ~= nil then
    return nil, nil, nil, "not a kombu message: 'headers' is " .. kind(headers)
      .. ', not an object'
  end
  return p['delivery_tag'], info['exchange'], info['routing_key'], nil
end

local alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
local digits = {}
for k = 1, 64 do digits[k - 1] = string.sub(alphabet, k, k) end

local function base64(s)
  local out, n = {}, #s
  local whole = n - n % 3
  for i = 1, whole, 3 do
    local a, b, c = string.byte(s, i, i + 2)
    local v = a * 65536 + b * 256 + c
    out[#out + 1] = digits[math.floor(v / 262144)] .. digits[math.floor(v / 4096) % 64]
      .. digits[math.floor(v / 64) % 64] .. digits[v % 64]
  end
  if n % 3 == 1 then
    local v = string.byte(s, n) * 65536
    out[#out + 1] = digits[math.floor(v / 262144)] .. digits[math.floor(v / 4096) % 64] .. '=='
  elseif n % 3 == 2 then
    local a, b = string.byte(s, n - 1, n)
    local v = a * 65536 + b * 256
    out[#out + 1] = digits[math.floor(v / 262144)] .. digits[math.floor(v / 4096) % 64]
      .. digits[math.floor(v / 64) % 64] .. '='
  end
  return table.concat(out)
end

local function letter(item, queue, reason, tag)
  return cjson.encode({
    ['body'] = base64(item),
    ['content-encoding'] = 'binary',
    ['content-type'] = 'application/octet-stream',
    ['headers'] = {['@REASON@'] = reason, ['@FROM@'] = queue, ['@KIND@'] = '@RAW@'},
    ['properties'] = {
      ['body_encoding'] = 'base64',
      ['delivery_tag'] = tag,
      ['delivery_info'] = {['exchange'] = '', ['routing_key'] = queue},
      ['priority'] = 0,
    },
  })
end

local taken, dead = {}, 0
local candidates = (#KEYS - 3) / 2
for i = 1, candidates do
  local key, dead_key, queue = KEYS[2 + 2 * i], KEYS[3 + 2 * i], ARGV[4 + i]
  while #taken < limit do
    local item = redis.call('RPOP', key)
    if not item then break end
    local tag, exchange, routing_key, reason = check(item)
    if reason then
      dead = dead + 1
      local id = redis.sha1hex(item .. now .. dead)
      redis.call('LPUSH', dead_key, letter(item, queue, reason, id))
    else
      local held = tag
      local n = 0
      while redis.call('HEXISTS', unacked, held) == 1 do
        n = n + 1
        held = tag .. '@ALIAS@' .. redis.sha1hex(item .. now .. n .. #taken)
      end
      redis.call('HSET', unacked, held, '[' .. item .. ',' .. cjson.encode(exchange) .. ','
        .. cjson.encode(routing_key) .. ']')
      redis.call('ZADD', index, now, held)
      local count = redis.call('HINCRBY', deliveries, tag, 1)
      taken[#taken + 1] = {i, held, item, count}
    end
  end
  if #taken >= limit then break end
end
local more = 0
if #taken >= limit then more = 1 end
return {more, dead, taken}
"""

TAKE = (
    _LUA.replace("@REASON@", DEAD_REASON_HEADER)
    .replace("@FROM@", DEAD_FROM_HEADER)
    .replace("@KIND@", DEAD_KIND_HEADER)
    .replace("@RAW@", DEAD_KIND_RAW)
    .replace("@ALIAS@", TAG_ALIAS_SEP)
)
"""The take script, with the header names and the alias separator of ``_constants``."""

TAKE_SHA = hashlib.sha1(TAKE.encode()).hexdigest()


def take_arguments(
    unacked: str,
    index: str,
    deliveries: str,
    candidates: Sequence[tuple[str, str, str]],
    now: float,
    limit: int,
    envelope_limit: int,
    max_bytes: int,
) -> list[Any]:
    """``EVALSHA``'s arguments after the script: key count, keys, argv. ``candidates``
    are ``(list key, dead-letter list key, queue name)``, keys already prefixed."""
    keys = [unacked, index, deliveries]
    for key, dead_key, _ in candidates:
        keys += [key, dead_key]
    argv: list[Any] = [repr(now), limit, envelope_limit, max_bytes]
    argv += [queue for _, _, queue in candidates]
    return [len(keys), *keys, *argv]


def run_take(client: Any, arguments: Sequence[Any]) -> Any:
    """Run the take script on ``client`` (its own connection, if it holds one), loading
    it when Redis does not have it. The keys in ``arguments`` are prefixed already: the
    call bypasses kombu's prefixing client, which would prefix the first key only."""
    execute: Any = redis.Redis.execute_command
    try:
        return execute(client, "EVALSHA", TAKE_SHA, *arguments)
    except NoScriptError:
        return execute(client, "EVAL", TAKE, *arguments)
