"""What mplb writes to and reads from the store: keys, messages and their limits.

Nothing a client sent is ever part of a key: a table entry is named by its table's tag
(mplb.persistence.store_tag) and the 128-bit digest the cluster's key gives the client
address or session id (mplb.shm.tables).  Everything read back is checked against
these limits before use; what does not parse is ignored (another program, or another
mplb version, may share the server).
"""
from __future__ import annotations

import json
import re

INSTANCE_TTL_MS = 3000          # an instance that stops publishing is gone after this
MAX_MESSAGE = 512
MAX_URL = 264                   # mplb.shm.layout.URL_MAX
MAX_PAYLOAD = 256 * 1024
MAX_PAYLOAD_URLS = 4096
MAX_INSTANCES = 64
MAX_COUNT = 1 << 40
_TAG = re.compile(rb"[0-9a-f]{12}")
_DIGEST = re.compile(rb"[0-9a-f]{32}")
_INSTANCE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_MASK = (1 << 64) - 1

# One round trip: write an entry, or (first writer wins) keep the one that is there.
# A writer that loses gets the winner back, and the winner is published again so the
# loser's master applies it in the same order as every other change to that key.
WRITE_ENTRY = """
if ARGV[5] == '1' then
  local current = redis.call('GET', KEYS[1])
  if current then
    if current ~= ARGV[1] then
      local left = redis.call('PTTL', KEYS[1])
      if left > 0 then
        redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' ' .. left .. ' ' .. current)
      end
    end
    return current
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' ' .. ARGV[2] .. ' ' .. ARGV[1])
return false
"""


def digest_hex(k1: int, k2: int) -> str:
    return f"{k1 & _MASK:016x}{k2 & _MASK:016x}"


def digest_words(text: bytes) -> tuple:
    """(k1, k2) as signed 64-bit words, the way the segment stores them."""
    k1, k2 = int(text[:16], 16), int(text[16:], 16)
    return (k1 - (1 << 64) if k1 >> 63 else k1), (k2 - (1 << 64) if k2 >> 63 else k2)


class Names:
    """Every key and channel under one prefix."""

    def __init__(self, prefix: str, instance: str):
        self.prefix = prefix
        self.instance = instance
        self.channel = f"{prefix}:entries"
        self.instances = f"{prefix}:instances"
        self.entries_match = f"{prefix}:e:*"
        self._entry_at = len(f"{prefix}:e:")

    def entry(self, tag: str, k1: int, k2: int) -> str:
        return f"{self.prefix}:e:{tag}:{digest_hex(k1, k2)}"

    def instance_key(self, instance: str) -> str:
        return f"{self.prefix}:i:{instance}"

    def parse_entry_key(self, key: bytes):
        """(tag, k1, k2) from an entry key found by SCAN, or None."""
        rest = key[self._entry_at:]
        if len(rest) != 45 or rest[12:13] != b":":
            return None
        if not _TAG.fullmatch(rest[:12]) or not _DIGEST.fullmatch(rest[13:]):
            return None
        return (rest[:12].decode(),) + digest_words(rest[13:])


def entry_message_head(tag: str, k1: int, k2: int) -> str:
    """What precedes the ttl and the URL in a published entry (see WRITE_ENTRY)."""
    return f"{tag} {digest_hex(k1, k2)}"


def parse_entry_message(data: bytes):
    """(tag, k1, k2, ttl ms, url) of a published entry, or None."""
    if not isinstance(data, bytes) or len(data) > MAX_MESSAGE:
        return None
    parts = data.split(b" ", 3)
    if len(parts) != 4 or not _TAG.fullmatch(parts[0]) or not _DIGEST.fullmatch(parts[1]):
        return None
    url = parse_url(parts[3])
    if url is None or not parts[2].isdigit() or len(parts[2]) > 12:
        return None
    return (parts[0].decode(),) + digest_words(parts[1]) + (int(parts[2]), url)


def parse_url(value):
    """A server URL read from the store, or None."""
    if not isinstance(value, bytes) or not 8 <= len(value) <= MAX_URL:
        return None
    if not value.startswith(b"http://") or b" " in value:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def valid_instance(name) -> bool:
    return isinstance(name, str) and bool(_INSTANCE.fullmatch(name))


def encode_payload(counts: dict, down) -> str:
    """One instance's published state: active connections per server URL and the URLs
    its own health checks hold down."""
    return json.dumps({"c": {url: n for url, n in counts.items() if n > 0},
                       "d": sorted(down)}, separators=(",", ":"))


def parse_payload(data):
    """(counts, down) of another instance, or None when it does not parse."""
    if not isinstance(data, bytes) or len(data) > MAX_PAYLOAD:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    counts, down = doc.get("c", {}), doc.get("d", [])
    if not isinstance(counts, dict) or not isinstance(down, list) \
            or len(counts) + len(down) > MAX_PAYLOAD_URLS:
        return None
    good = {url: n for url, n in counts.items()
            if isinstance(url, str) and len(url) <= MAX_URL
            and type(n) is int and 0 <= n < MAX_COUNT}
    return good, {url for url in down if isinstance(url, str) and len(url) <= MAX_URL}


def sum_instances(payloads) -> tuple:
    """Active counts summed per URL, and every URL some instance holds down."""
    totals, down = {}, set()
    for counts, held in payloads:
        for url, n in counts.items():
            totals[url] = totals.get(url, 0) + n
        down |= held
    return totals, down
