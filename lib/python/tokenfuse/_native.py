"""ctypes bindings to libtokenfuse's C ABI (<tokenfuse/tokenfuse.h>), and the process's client.

Nothing here allocates or calls the kernel on a decision: each one is one foreign call into the
library, which reads and updates the shared-memory region.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from decimal import Decimal

logger = logging.getLogger("tokenfuse")

NANO = Decimal(1_000_000_000)

# enum tf_code
OK = 0
RUN_BUDGET_EXHAUSTED = 1
TENANT_BUDGET_EXHAUSTED = 2
PLATFORM_BUDGET_EXHAUSTED = 3
EMERGENCY_KILL = 4
MODEL_BUDGET_EXHAUSTED = 5
AGENT_BUDGET_EXHAUSTED = 6
TAG_BUDGET_EXHAUSTED = 7
REQUEST_RATE_EXCEEDED = 8
TOKEN_RATE_EXCEEDED = 9
CONCURRENCY_EXCEEDED = 10
INVALID_ARGUMENT = 100
CAPACITY_EXHAUSTED = 101
LEDGER_FULL = 105
LEDGER_LOST = 106
REGION_CORRUPT = 107
LEDGER_UNAVAILABLE = 108
STALE_OWNER = 109
BUDGET_CODES = frozenset({RUN_BUDGET_EXHAUSTED, TENANT_BUDGET_EXHAUSTED, PLATFORM_BUDGET_EXHAUSTED, EMERGENCY_KILL,
                          MODEL_BUDGET_EXHAUSTED, AGENT_BUDGET_EXHAUSTED, TAG_BUDGET_EXHAUSTED})
RATE_CODES = frozenset({REQUEST_RATE_EXCEEDED, TOKEN_RATE_EXCEEDED, CONCURRENCY_EXCEEDED})


class Decision(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_int32),
        ("reservation_expired", ctypes.c_int32),
        ("cost_nano_usd", ctypes.c_int64),
        ("used_nano_usd", ctypes.c_int64),
        ("limit_nano_usd", ctypes.c_int64),
        ("ledger_seq", ctypes.c_uint64),
        ("rule", ctypes.c_uint32),
        ("reserved_", ctypes.c_uint32),
        ("resets_unix_ns", ctypes.c_int64),
    ]


class Call(ctypes.Structure):
    _fields_ = [
        ("project_id", ctypes.c_char_p),
        ("model", ctypes.c_char_p),
        ("run_id", ctypes.c_char_p),
        ("agent_id", ctypes.c_char_p),
        ("estimated_prompt_tokens", ctypes.c_int64),
        ("estimated_completion_tokens", ctypes.c_int64),
        ("ttl_ms", ctypes.c_int64),
        ("tags", ctypes.c_char_p),
    ]


class Usage(ctypes.Structure):
    _fields_ = [
        ("project_id", ctypes.c_char_p),
        ("model", ctypes.c_char_p),
        ("provider", ctypes.c_char_p),
        ("run_id", ctypes.c_char_p),
        ("agent_id", ctypes.c_char_p),
        ("prompt_tokens", ctypes.c_int64),
        ("completion_tokens", ctypes.c_int64),
        ("tags", ctypes.c_char_p),
    ]


class BudgetView(ctypes.Structure):
    _fields_ = [
        ("tracked", ctypes.c_int32),
        ("has_limit", ctypes.c_int32),
        ("limit_nano_usd", ctypes.c_int64),
        ("committed_nano_usd", ctypes.c_int64),
        ("held_nano_usd", ctypes.c_int64),
        ("prompt_tokens", ctypes.c_int64),
        ("completion_tokens", ctypes.c_int64),
        ("calls", ctypes.c_int64),
        ("denials", ctypes.c_int64),
        ("day", ctypes.c_int32),
        ("reserved_", ctypes.c_int32),
        ("elsewhere_nano_usd", ctypes.c_int64),
    ]


class KillState(ctypes.Structure):
    _fields_ = [
        ("active", ctypes.c_int32),
        ("reserved_", ctypes.c_int32),
        ("since_unix_ns", ctypes.c_int64),
        ("expires_unix_ns", ctypes.c_int64),
        ("reason", ctypes.c_char * 257),
    ]


def _load() -> ctypes.CDLL:
    path = os.environ.get("TOKENFUSE_LIBRARY") or ctypes.util.find_library("tokenfuse") or "libtokenfuse.so.0.2"
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise ImportError(
            f"tokenfuse: cannot load libtokenfuse ({path}): {exc}; install the tokenfuse library package, "
            "or set TOKENFUSE_LIBRARY to the path of libtokenfuse.so"
        ) from exc
    c = ctypes
    client = c.c_void_p
    sigs = {
        "tf_attach": (c.c_int, [c.c_char_p, c.POINTER(client), c.c_char_p, c.c_size_t]),
        "tf_detach": (None, [client]),
        "tf_check": (Decision, [client, c.c_char_p, c.c_char_p, c.c_int64, c.c_char_p]),
        "tf_check_call": (Decision, [client, c.POINTER(Call)]),
        "tf_reserve": (Decision, [client, c.POINTER(Call), c.POINTER(c.c_uint64)]),
        "tf_commit": (Decision, [client, c.c_uint64, c.c_char_p, c.c_int64, c.c_int64]),
        "tf_charge": (Decision, [client, c.c_uint64, c.c_int64, c.c_int64]),
        "tf_release": (Decision, [client, c.c_uint64]),
        "tf_record": (Decision, [client, c.POINTER(Usage)]),
        "tf_wait_durable": (c.c_int, [client, c.c_uint64, c.c_int64]),
        "tf_price": (c.c_int, [client, c.c_char_p, c.POINTER(c.c_int64), c.POINTER(c.c_int64)]),
        "tf_reference_price": (c.c_int, [c.c_char_p, c.POINTER(c.c_int64), c.POINTER(c.c_int64)]),
        "tf_tenant_usage": (c.c_int, [client, c.c_char_p, c.POINTER(BudgetView)]),
        "tf_run_usage": (c.c_int, [client, c.c_char_p, c.POINTER(BudgetView)]),
        "tf_platform_usage": (c.c_int, [client, c.POINTER(BudgetView)]),
        "tf_kill_switch": (c.c_int, [client, c.POINTER(KillState)]),
        "tf_error_code": (c.c_char_p, [c.c_int32]),
        "tf_describe": (c.c_size_t, [c.POINTER(Decision), c.c_char_p, c.c_char_p, c.c_size_t]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


lib = _load()


def encode(s: str | None) -> bytes | None:
    return None if s is None else s.encode()


def encode_tags(tags) -> bytes | None:
    """tags= as the library takes them: None, "a,b", or an iterable of tags."""
    if tags is None:
        return None
    return (tags if isinstance(tags, str) else ",".join(tags)).encode()


def usd(nano: int) -> Decimal:
    return Decimal(nano) / NANO


def error_code(code: int) -> str:
    return lib.tf_error_code(code).decode()


def describe(d: Decision, project_id: str | None) -> str:
    buf = ctypes.create_string_buffer(512)
    lib.tf_describe(ctypes.byref(d), encode(project_id), buf, len(buf))
    return buf.value.decode()


class Client:
    """The process's attachment to the agent's region; safe to share between threads."""

    def __init__(self, shm_name: str) -> None:
        self.shm_name = shm_name
        self._lock = threading.Lock()
        self._handle: ctypes.c_void_p | None = None
        self._last_attempt = 0.0
        self._warned = False

    def handle(self) -> ctypes.c_void_p | None:
        """The attached client, or None while the region is unavailable (retried once a second)."""
        h = self._handle
        if h is not None:
            return h
        with self._lock:
            if self._handle is None and time.monotonic() - self._last_attempt >= 1.0:
                self._last_attempt = time.monotonic()
                out = ctypes.c_void_p()
                err = ctypes.create_string_buffer(512)
                if lib.tf_attach(self.shm_name.encode(), ctypes.byref(out), err, len(err)) == 0:
                    self._handle = out
                    if self._warned:
                        logger.warning("tokenfuse_region_attached", extra={"shm_name": self.shm_name})
                    self._warned = False
                else:
                    self.error = err.value.decode()
                    if not self._warned:
                        logger.warning("tokenfuse_region_unavailable: %s", self.error)
                        self._warned = True
            return self._handle

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                lib.tf_detach(self._handle)
                self._handle = None
