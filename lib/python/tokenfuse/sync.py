"""The reference module's API in synchronous form, over the agent's shared-memory region.

Same names, signatures and behaviour as awooop_token_budget (see the package docstring); every
decision is a call into libtokenfuse, nanoseconds and no system call. Configuration, from the
environment or configure():

  TOKENFUSE_SHM               the region tokenfused was started with (default "tokenfuse")
  TOKENFUSE_FAIL_OPEN         "1" (default, as the reference): while no agent runs on this host,
                              calls are allowed and a warning is logged once; "0": raise
                              TokenfuseUnavailableError instead
  TOKENFUSE_URL               the agent's HTTP API, for the kill-switch admin functions
  TOKENFUSE_DATA_DIR          the agent's data dir (its http.port and admin.token files)
  TOKENFUSE_ADMIN_TOKEN_FILE  the admin token (default <data dir>/admin.token)
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import math
import os
import time
import urllib.error
import urllib.request
from decimal import ROUND_HALF_EVEN, Decimal

from . import _native as n
from ._native import logger

BUDGET_ALERT_THRESHOLDS = {
    "warn": Decimal("0.80"),
    "critical": Decimal("0.95"),
    "hard_kill": Decimal("1.00"),
}


class BudgetExhaustedError(Exception):
    """The call was refused: a budget is spent (E-BUDGET-001..003, and -005..007 for budget rules
    on a model, an agent or a tag) or the kill switch is on (-004). `rule` names the budget rule
    that refused (1 + its index; 0 for a built-in layer) and `resets_unix_ns` when its window
    ends (0: never)."""

    def __init__(self, error_code: str, message: str, rule: int = 0, resets_unix_ns: int = 0) -> None:
        self.error_code = error_code
        self.rule = rule
        self.resets_unix_ns = resets_unix_ns
        super().__init__(f"[{error_code}] {message}")


class RateLimitedError(BudgetExhaustedError):
    """A budget rule on requests (E-RATE-001), tokens (E-RATE-002) or calls in flight
    (E-CONCURRENCY-001) refused the call: retry after `resets_unix_ns` (a rate) or once calls
    finish (concurrency). A BudgetExhaustedError, so code that catches that one catches it too."""


class TokenfuseError(RuntimeError):
    """The agent could not take the call for a reason other than a budget (see error_code)."""

    def __init__(self, error_code: str, message: str) -> None:
        self.error_code = error_code
        super().__init__(f"[{error_code}] {message}")


class TokenfuseUnavailableError(TokenfuseError):
    """No agent region on this host, and TOKENFUSE_FAIL_OPEN=0."""


_settings = {
    "shm_name": os.environ.get("TOKENFUSE_SHM", "tokenfuse"),
    "fail_open": os.environ.get("TOKENFUSE_FAIL_OPEN", "1") != "0",
}
_client = n.Client(_settings["shm_name"])


_retired: list[n.Client] = []


def configure(*, shm_name: str | None = None, fail_open: bool | None = None) -> None:
    """Points the module at another region, or changes the fail-open policy."""
    global _client
    if fail_open is not None:
        _settings["fail_open"] = fail_open
    if shm_name is not None and shm_name != _client.shm_name:
        # Not detached: other threads and open reservations may still be using it.
        _retired.append(_client)
        _client = n.Client(shm_name)


def _handle():
    h = _client.handle()
    if h is None and not _settings["fail_open"]:
        raise TokenfuseUnavailableError("E-TOKENFUSE-UNAVAILABLE", getattr(_client, "error", "no region"))
    return h


def _raise_for(d: n.Decision, project_id: str | None) -> None:
    if d.code == n.OK:
        return
    message = n.describe(d, project_id)
    if d.code in n.RATE_CODES:
        raise RateLimitedError(n.error_code(d.code), message, d.rule, d.resets_unix_ns)
    if d.code in n.BUDGET_CODES:
        raise BudgetExhaustedError(n.error_code(d.code), message, d.rule, d.resets_unix_ns)
    if d.code == n.INVALID_ARGUMENT:
        raise ValueError(f"[{n.error_code(d.code)}] {message}")
    raise TokenfuseError(n.error_code(d.code), message)


def _tokens(name: str, value: int | float) -> int:
    """A token count as the library takes it: estimates may be floats (the reference's callers
    multiply by 1.5), and round up."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a non-negative number, not {value!r}")
    return math.ceil(value)


# --- Prices --------------------------------------------------------------------------------------

def estimate_cost(prompt_tokens: int, completion_tokens: int, model: str) -> Decimal:
    """The call's cost in USD at the agent's prices (the reference's table unless configured),
    rounded to six places as the reference rounds it."""
    prompt_tokens = _tokens("prompt_tokens", prompt_tokens)
    completion_tokens = _tokens("completion_tokens", completion_tokens)
    p, c = ctypes.c_int64(), ctypes.c_int64()
    h = _client.handle()
    rc = n.lib.tf_price(h, model.encode(), p, c) if h is not None else n.lib.tf_reference_price(model.encode(), p, c)
    if rc != 0:
        raise ValueError(f"model must be a non-empty name of at most 128 bytes, not {model!r}")
    nano_times_mtok = prompt_tokens * p.value + completion_tokens * c.value   # nano-USD x 1e6
    return (Decimal(nano_times_mtok) / Decimal(10**15)).quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN)


# --- Before the call -------------------------------------------------------------------------------

def check_emergency_kill() -> None:
    """Raises BudgetExhaustedError("E-BUDGET-004", ...) while the kill switch is on (and
    TokenfuseUnavailableError with no agent, if TOKENFUSE_FAIL_OPEN=0)."""
    if is_emergency_kill_active():
        raise BudgetExhaustedError("E-BUDGET-004", "Emergency kill switch activated — contact platform admin")


def check_budget_before_llm_call(
    project_id: str,
    model: str,
    estimated_prompt_tokens: int = 4000,
    *,
    agent_id: str | None = None,
    run_id: str | None = None,
    tags=None,
) -> None:
    """Raises BudgetExhaustedError if the call may not be made: the kill switch first, then (for
    paid models) the run, tenant and platform budgets, then the budget rules that apply to the
    call (its agent_id and `tags`, "a,b" or a list, select them too). A check holds nothing: use
    reserve() to make the limit exact under concurrency."""
    estimated_prompt_tokens = _tokens("estimated_prompt_tokens", estimated_prompt_tokens)
    h = _handle()
    if h is None:
        return   # fail open: logged once by the client
    call = n.Call(project_id.encode(), model.encode(), n.encode(run_id), n.encode(agent_id), estimated_prompt_tokens, 0,
                  0, n.encode_tags(tags))
    d = n.lib.tf_check_call(h, ctypes.byref(call))
    _raise_for(d, project_id)


# --- After the call ----------------------------------------------------------------------------

def record_token_usage(
    *,
    project_id: str,
    model: str,
    provider: str,
    prompt_tokens: int,
    completion_tokens: int,
    agent_id: str | None = None,
    run_id: str | None = None,
    tags=None,
) -> Decimal:
    """Books a finished call and returns its cost in USD (and counts it on the budget rules that
    apply to it; `tags` as for check_budget_before_llm_call). The entry is in the host's ledger when
    this returns (in the region, which outlives this process; on disk within milliseconds).
    As the reference, it never raises once the call has been made: a booking that fails is
    logged (token_usage_not_recorded) and the estimated cost returned."""
    usage = _usage(project_id, model, provider, prompt_tokens, completion_tokens, agent_id, run_id, tags)
    if usage is None:
        return _not_recorded(project_id, model, prompt_tokens, completion_tokens, "no tokenfuse agent on this host")
    h, u = usage
    d = n.Decision()
    for pause in _ring_full_pauses():
        d = n.lib.tf_record(h, ctypes.byref(u))
        if d.code != n.LEDGER_FULL:
            break
        time.sleep(pause)
    return _recorded(d, project_id, model, prompt_tokens, completion_tokens)


async def _record_token_usage_async(**kwargs) -> Decimal:
    """record_token_usage for the event loop: waits out a full ledger ring without blocking it."""
    usage = _usage(kwargs["project_id"], kwargs["model"], kwargs["provider"], kwargs["prompt_tokens"],
                   kwargs["completion_tokens"], kwargs.get("agent_id"), kwargs.get("run_id"), kwargs.get("tags"))
    if usage is None:
        return _not_recorded(kwargs["project_id"], kwargs["model"], kwargs["prompt_tokens"],
                             kwargs["completion_tokens"], "no tokenfuse agent on this host")
    h, u = usage
    d = n.Decision()
    for pause in _ring_full_pauses():
        d = n.lib.tf_record(h, ctypes.byref(u))
        if d.code != n.LEDGER_FULL:
            break
        await asyncio.sleep(pause)
    return _recorded(d, kwargs["project_id"], kwargs["model"], kwargs["prompt_tokens"], kwargs["completion_tokens"])


def _usage(project_id, model, provider, prompt_tokens, completion_tokens, agent_id, run_id, tags):
    """(handle, tf_usage) for a record, or None while no agent runs (fail open)."""
    u = n.Usage(project_id.encode(), model.encode(), provider.encode(), n.encode(run_id), n.encode(agent_id),
                _tokens("prompt_tokens", prompt_tokens), _tokens("completion_tokens", completion_tokens),
                n.encode_tags(tags))
    h = _handle()
    return None if h is None else (h, u)


def _ring_full_pauses():
    """Pauses between attempts of a commit or record that meets a full ledger ring (the agent is
    behind): nothing is booked then, so retrying is safe. About 5 s in all."""
    deadline = time.monotonic() + 5.0
    pause = 0.0005
    while True:
        yield pause
        if time.monotonic() >= deadline:
            return
        pause = min(pause * 2, 0.05)


def _recorded(d: n.Decision, project_id: str, model: str, prompt_tokens, completion_tokens) -> Decimal:
    """The cost of a commit or record that was attempted after the call was made."""
    if d.code == n.OK:
        return n.usd(d.cost_nano_usd)
    if d.code == n.LEDGER_LOST:
        logger.error("token_usage_ledger_lost: booked, but not in the ledger (project_id=%s model=%s)", project_id, model)
        return n.usd(d.cost_nano_usd)
    if d.code == n.CAPACITY_EXHAUSTED and d.ledger_seq > 0:
        # In the ledger, but its tenant or run has a limit and no table room: not counted there.
        logger.error("token_usage_untracked: in the ledger, but not counted against the limit of project_id=%s "
                     "(the tenant or run table is full)", project_id)
        return n.usd(d.cost_nano_usd)
    if d.code == n.INVALID_ARGUMENT:
        _raise_for(d, project_id)
    return _not_recorded(project_id, model, prompt_tokens, completion_tokens,
                         f"[{n.error_code(d.code)}] {n.describe(d, project_id)}")


def _not_recorded(project_id: str, model: str, prompt_tokens, completion_tokens, why: str) -> Decimal:
    logger.error("token_usage_not_recorded: %s (project_id=%s model=%s)", why, project_id, model)
    return estimate_cost(prompt_tokens, completion_tokens, model)


def wait_durable(ledger_seq: int, timeout_s: float = 5.0) -> bool:
    """Waits until the ledger entry is on disk. Not needed for correctness; for tests and audits."""
    h = _handle()
    return h is not None and n.lib.tf_wait_durable(h, ledger_seq, int(timeout_s * 1000)) == 1


# --- Reservations: the exact limit, and streaming --------------------------------------------------

class Reservation:
    """A hold on the estimated cost, ended by commit() or release(). As a context manager (with or
    async with) it ends on exit: what was charged (a stream stopped half-way) is committed, and
    a reservation nothing was charged to is released, so an exception never leaks a hold nor
    loses tokens that were received."""

    def __init__(self, project_id: str, model: str, estimated_prompt_tokens, estimated_completion_tokens,
                 run_id: str | None, agent_id: str | None, ttl_s: float | None, provider: str | None,
                 tags=None) -> None:
        self.project_id, self.model, self.provider = project_id, model, provider or ""
        self.id = 0
        self.reserved_usd = Decimal(0)
        self.cost_usd: Decimal | None = None
        self.ledger_seq = 0
        self._charged = (0, 0)
        prompt = _tokens("estimated_prompt_tokens", estimated_prompt_tokens)
        completion = _tokens("estimated_completion_tokens", estimated_completion_tokens)
        self._h = _handle()
        if self._h is None:   # fail open
            self.reserved_usd = estimate_cost(prompt, completion, model)
            return
        call = n.Call(project_id.encode(), model.encode(), n.encode(run_id), n.encode(agent_id), prompt, completion,
                      int((ttl_s or 0) * 1000), n.encode_tags(tags))
        rid = ctypes.c_uint64()
        d = n.lib.tf_reserve(self._h, ctypes.byref(call), ctypes.byref(rid))
        _raise_for(d, project_id)
        self.id = rid.value
        self.reserved_usd = n.usd(d.cost_nano_usd)

    @property
    def open(self) -> bool:
        return self.id != 0

    def charge(self, completion_tokens: int, prompt_tokens: int = 0) -> Decimal:
        """Streaming: books more tokens against the hold as they arrive, growing it if needed.
        Charge the prompt tokens with the first chunk. Raises BudgetExhaustedError when a budget
        cannot cover them: stop the stream (leaving the with block commits what was charged).
        Returns the cost of everything charged so far."""
        completion_tokens = _tokens("completion_tokens", completion_tokens)
        prompt_tokens = _tokens("prompt_tokens", prompt_tokens)
        if not self.open:
            return Decimal(0)
        d = n.lib.tf_charge(self._h, self.id, prompt_tokens, completion_tokens)
        _raise_for(d, self.project_id)
        self._charged = (self._charged[0] + prompt_tokens, self._charged[1] + completion_tokens)
        return n.usd(d.cost_nano_usd)

    def commit(self, provider: str, prompt_tokens: int, completion_tokens: int) -> Decimal:
        """Books the call's actual cost, returns the rest of the hold, and ends the reservation.
        Never raises for the budget: the call has been made (see record_token_usage)."""
        prompt_tokens = _tokens("prompt_tokens", prompt_tokens)
        completion_tokens = _tokens("completion_tokens", completion_tokens)
        if self._h is None:
            self.cost_usd = _not_recorded(self.project_id, self.model, prompt_tokens, completion_tokens,
                                          "no tokenfuse agent on this host")
            return self.cost_usd
        if not self.open:
            raise TokenfuseError("E-TOKENFUSE-UNKNOWN-RESERVATION", "the reservation has already ended")
        d = n.Decision()
        for pause in _ring_full_pauses():
            d = n.lib.tf_commit(self._h, self.id, provider.encode(), prompt_tokens, completion_tokens)
            if d.code != n.LEDGER_FULL:
                break
            time.sleep(pause)
        if d.code != n.LEDGER_FULL:
            self.id = 0
        self.ledger_seq = d.ledger_seq
        self.cost_usd = _recorded(d, self.project_id, self.model, prompt_tokens, completion_tokens)
        return self.cost_usd

    def release(self) -> None:
        """Returns the hold without booking anything (the call was not made)."""
        if self.open:
            n.lib.tf_release(self._h, self.id)
            self.id = 0

    def _end(self) -> None:
        if self.open and self._charged != (0, 0):
            self.commit(self.provider, *self._charged)
        self.release()

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self._end()

    async def __aenter__(self) -> "Reservation":
        return self

    async def __aexit__(self, *exc) -> None:
        self._end()


def reserve(
    project_id: str,
    model: str,
    estimated_prompt_tokens: int = 4000,
    estimated_completion_tokens: int = 0,
    *,
    run_id: str | None = None,
    agent_id: str | None = None,
    ttl_s: float | None = None,
    provider: str | None = None,
    tags=None,
) -> Reservation:
    """Holds the estimated cost against the run, tenant and platform budgets, all or nothing, or
    raises BudgetExhaustedError. Concurrent reservations can never together pass a limit. Set
    estimated_completion_tokens to the request's max_tokens to make the limit exact. `provider`
    is what the ledger records if the with block ends with tokens charged but not committed."""
    return Reservation(project_id, model, estimated_prompt_tokens, estimated_completion_tokens, run_id, agent_id, ttl_s,
                       provider, tags)


# --- Views ---------------------------------------------------------------------------------------

def tenant_usage(project_id: str) -> dict:
    """Today's spending of a tenant on this host: used_usd, reserved_usd, elsewhere_usd (the
    fleet's other hosts, with a central link), limit_usd (None = unlimited), calls."""
    return _view(lambda h, v: n.lib.tf_tenant_usage(h, project_id.encode(), v))


def platform_usage() -> dict:
    return _view(lambda h, v: n.lib.tf_platform_usage(h, v))


def _view(fill) -> dict:
    h = _client.handle()
    if h is None:
        raise TokenfuseUnavailableError("E-TOKENFUSE-UNAVAILABLE", getattr(_client, "error", "no region"))
    v = n.BudgetView()
    if fill(h, ctypes.byref(v)) != 0:
        raise ValueError("the id must be a non-empty string of at most 128 bytes")
    return {
        "used_usd": n.usd(v.committed_nano_usd),
        "reserved_usd": n.usd(v.held_nano_usd),
        "elsewhere_usd": n.usd(v.elsewhere_nano_usd),
        "limit_usd": n.usd(v.limit_nano_usd) if v.has_limit else None,
        "calls": v.calls,
    }


# --- The emergency kill switch -----------------------------------------------------------------------

def is_emergency_kill_active() -> bool:
    """Read from the region: no network. With no agent: False (as the reference on a Redis
    error), or TokenfuseUnavailableError if TOKENFUSE_FAIL_OPEN=0."""
    h = _handle()
    if h is None:
        return False
    k = n.KillState()
    return n.lib.tf_kill_switch(h, ctypes.byref(k)) == 0 and bool(k.active)


def activate_emergency_kill(reason: str = "") -> None:
    """Every call on this host is refused with E-BUDGET-004 for 7 days, or until deactivated.
    A change: it goes through the agent's admin API and needs its token."""
    _admin("PUT", "/v1/kill", {"reason": reason or "activated", "ttl_s": 7 * 86400})
    logger.warning("budget_emergency_kill_activated: %s", reason)


def deactivate_emergency_kill() -> None:
    _admin("DELETE", "/v1/kill", None)
    logger.info("budget_emergency_kill_deactivated")


def _first_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip()
    except OSError:
        return ""


def _admin(method: str, path: str, body: dict | None) -> None:
    data_dir = os.environ.get("TOKENFUSE_DATA_DIR", "/var/lib/tokenfuse")
    url = os.environ.get("TOKENFUSE_URL") or "http://127.0.0.1:" + (_first_line(data_dir + "/http.port") or "8787")
    token_file = os.environ.get("TOKENFUSE_ADMIN_TOKEN_FILE") or data_dir + "/admin.token"
    token = _first_line(token_file)
    if not token:
        raise TokenfuseError("E-TOKENFUSE-UNAUTHORIZED",
                             f"cannot read the admin token from {token_file} (set TOKENFUSE_ADMIN_TOKEN_FILE)")
    req = urllib.request.Request(url.rstrip("/") + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10):
            pass
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("message", str(exc))
        except ValueError:
            message = str(exc)
        raise TokenfuseError("E-TOKENFUSE-ADMIN", f"the agent refused: {message} (HTTP {exc.code})") from None
    except OSError as exc:
        raise TokenfuseError("E-TOKENFUSE-UNAVAILABLE", f"cannot reach the agent at {url}: {exc}") from None
