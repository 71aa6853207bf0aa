"""The Python binding against a real tokenfused, run with the system python3 (stdlib only).

ctest sets TOKENFUSED (the agent binary), TOKENFUSE_LIBRARY (libtokenfuse.so) and PYTHONPATH.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.request
import uuid
from decimal import Decimal

SHM = "tfpy-" + uuid.uuid4().hex[:10]
os.environ["TOKENFUSE_SHM"] = SHM

import tokenfuse  # noqa: E402  (after TOKENFUSE_SHM)
from tokenfuse import sync  # noqa: E402

CONFIG = """
[agent]
shm_name = "{shm}"
data_dir = "{dir}/state"
tick_ms = 50
[http]
listen = "127.0.0.1:0"
[region]
tenant_capacity = 256
run_capacity = 256
reservation_capacity = 512
[budgets]
platform_daily_limit_usd = "500"
[budgets.tenants]
acme = "1.00"
small = "0.05"
tiny = "0.001"
[budgets.runs]
run-1 = "0.03"
run-2 = "0.03"

[[rules]]
name = "py-batch-rpm"
scope = "tag"
match = "py-batch"
window = "month"
metric = "requests"
limit = 2

[[rules]]
name = "py-agent-money"
scope = "agent"
match = "py-agent"
window = "month"
limit = "0.01"
"""


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


class Agent:
    """A real tokenfused on a temp data dir and its own region."""

    def __init__(self, shm: str = SHM, config: str = CONFIG) -> None:
        self.shm = shm
        self.dir = tempfile.mkdtemp(prefix="tokenfuse-py-")
        with open(self.dir + "/tokenfuse.toml", "w") as f:
            f.write(config.format(shm=shm, dir=self.dir))
        self.log = open(self.dir + "/agent.log", "w")
        self.proc = subprocess.Popen([os.environ["TOKENFUSED"], "--config", self.dir + "/tokenfuse.toml"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        if not wait_for(lambda: os.path.exists(self.dir + "/state/http.port")):
            with open(self.dir + "/agent.log") as f:
                raise RuntimeError("tokenfused did not start: " + f.read())
        os.environ["TOKENFUSE_DATA_DIR"] = self.dir + "/state"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=20)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            os.unlink("/dev/shm/" + self.shm)
        except FileNotFoundError:
            pass

    def ledger(self, project_id: str) -> list[dict]:
        with open(self.dir + "/state/http.port") as f:
            port = f.read().strip()
        with open(self.dir + "/state/admin.token") as f:
            token = f.read().strip()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/ledger?project_id={project_id}",
                                     headers={"Authorization": "Bearer " + token})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)["entries"]


agent: Agent | None = None


def setUpModule() -> None:
    global agent
    agent = Agent()


def tearDownModule() -> None:
    tokenfuse.configure(shm_name="tokenfuse")   # detach before the region goes
    if agent is not None:
        agent.stop()


def reserve_in_child(n: int, q) -> None:
    ok = 0
    for _ in range(n):
        try:
            with tokenfuse.reserve("race", "gpt-4o", 8400) as r:
                r.commit("openai", 8400, 0)
                ok += 1
        except tokenfuse.BudgetExhaustedError:
            pass
    q.put(ok)


class ReferenceApi(unittest.TestCase):
    def test_estimate_cost_is_the_reference_price_rounded_to_six_places(self) -> None:
        self.assertEqual(tokenfuse.estimate_cost(1000, 500, "gpt-4o"), Decimal("0.012500"))
        self.assertEqual(tokenfuse.estimate_cost(1_000_000, 0, "claude-opus-4-7"), Decimal("15.000000"))
        self.assertEqual(tokenfuse.estimate_cost(1234, 0, "gemini-2.0-flash"), Decimal("0.000093"))   # 0.00009255
        self.assertEqual(tokenfuse.estimate_cost(100, 100, "qwen3:8b"), Decimal("0"))
        self.assertEqual(tokenfuse.estimate_cost(1000, 1000, "no-such-model"), Decimal("0.018000"))   # fallback
        with self.assertRaises(ValueError):
            tokenfuse.estimate_cost(-1, 0, "gpt-4o")

    def test_check_raises_budget_exhausted_with_the_reference_error_codes(self) -> None:
        asyncio.run(tokenfuse.check_budget_before_llm_call("acme", "gpt-4o"))
        with self.assertRaises(tokenfuse.BudgetExhaustedError) as e:
            asyncio.run(tokenfuse.check_budget_before_llm_call("tiny", "gpt-4o", estimated_prompt_tokens=4000))
        self.assertEqual(e.exception.error_code, "E-BUDGET-002")
        self.assertEqual(str(e.exception), "[E-BUDGET-002] Tenant tiny budget exhausted: used $0.0000 / $0.0010")
        # Free local models skip the money layers.
        asyncio.run(tokenfuse.check_budget_before_llm_call("tiny", "qwen3:8b", estimated_prompt_tokens=10**6))
        asyncio.run(tokenfuse.check_budget_before_llm_call("tiny", "ollama/llama3", estimated_prompt_tokens=10**6))
        with self.assertRaises(tokenfuse.BudgetExhaustedError) as e:
            sync.check_budget_before_llm_call("acme", "gpt-4o", 7000, run_id="run-1")   # $0.035 > run's $0.03
        self.assertEqual(e.exception.error_code, "E-BUDGET-001")
        with self.assertRaises(tokenfuse.BudgetExhaustedError) as e:
            sync.check_budget_before_llm_call("acme", "claude-opus-4-7", 34_000_000)   # $510 > platform's $500
        self.assertIn(e.exception.error_code, ("E-BUDGET-002", "E-BUDGET-003"))
        with self.assertRaises(ValueError):
            sync.check_budget_before_llm_call("x" * 200, "gpt-4o")

    def test_record_token_usage_books_the_cost_and_writes_the_ledger(self) -> None:
        cost = asyncio.run(tokenfuse.record_token_usage(project_id="books", model="gpt-4o", provider="openai",
                                                        prompt_tokens=1000, completion_tokens=500, agent_id="a1",
                                                        run_id="r-books"))
        self.assertEqual(cost, Decimal("0.0125"))
        self.assertEqual(tokenfuse.tenant_usage("books")["used_usd"], Decimal("0.0125"))
        self.assertTrue(wait_for(lambda: len(agent.ledger("books")) == 1))
        entry = agent.ledger("books")[0]
        self.assertEqual((entry["model"], entry["provider"], entry["agent_id"], entry["run_id"], entry["cost_usd"]),
                         ("gpt-4o", "openai", "a1", "r-books", "0.012500"))

    def test_a_service_written_for_the_reference_runs_unchanged_until_its_budget_is_spent(self) -> None:
        # The reference's calling pattern, verbatim but for the import.
        from tokenfuse import BudgetExhaustedError, check_budget_before_llm_call, record_token_usage

        async def call_llm(project_id: str) -> Decimal:
            await check_budget_before_llm_call(project_id, "claude-sonnet-4-6", estimated_prompt_tokens=2000)
            return await record_token_usage(project_id=project_id, model="claude-sonnet-4-6", provider="anthropic",
                                            prompt_tokens=2000, completion_tokens=1000)

        async def loop() -> tuple[int, str]:
            calls = 0
            try:
                while True:
                    await call_llm("small")
                    calls += 1
            except BudgetExhaustedError as e:
                return calls, e.error_code

        calls, code = asyncio.run(loop())
        # Each call costs $0.021 and is checked at $0.006: two fit under $0.05, the third check fails.
        self.assertEqual((calls, code), (3, "E-BUDGET-002"))
        self.assertEqual(tokenfuse.tenant_usage("small")["used_usd"], Decimal("0.063"))

    def test_kill_switch_functions_go_through_the_agent_and_stop_every_call(self) -> None:
        self.assertFalse(asyncio.run(tokenfuse.is_emergency_kill_active()))
        asyncio.run(tokenfuse.activate_emergency_kill("runaway loop"))
        try:
            self.assertTrue(sync.is_emergency_kill_active())
            for model in ("gpt-4o", "qwen3:8b"):
                with self.assertRaises(tokenfuse.BudgetExhaustedError) as e:
                    sync.check_budget_before_llm_call("acme", model)
                self.assertEqual(e.exception.error_code, "E-BUDGET-004")
            with self.assertRaises(tokenfuse.BudgetExhaustedError):
                asyncio.run(tokenfuse.check_emergency_kill())
        finally:
            asyncio.run(tokenfuse.deactivate_emergency_kill())
        self.assertFalse(sync.is_emergency_kill_active())
        os.environ["TOKENFUSE_ADMIN_TOKEN_FILE"] = "/nonexistent/token"
        try:
            with self.assertRaises(tokenfuse.TokenfuseError) as e:
                sync.activate_emergency_kill("x")
            self.assertIn("cannot read the admin token", str(e.exception))
        finally:
            del os.environ["TOKENFUSE_ADMIN_TOKEN_FILE"]


class Reservations(unittest.TestCase):
    def test_commit_books_the_actual_cost_and_returns_the_rest_of_the_hold(self) -> None:
        with tokenfuse.reserve("resv", "gpt-4o", 1000, estimated_completion_tokens=1000) as r:
            self.assertEqual(r.reserved_usd, Decimal("0.02"))
            self.assertEqual(tokenfuse.tenant_usage("resv")["reserved_usd"], Decimal("0.02"))
            self.assertEqual(r.commit("openai", 1000, 200), Decimal("0.008"))
        u = tokenfuse.tenant_usage("resv")
        self.assertEqual((u["used_usd"], u["reserved_usd"]), (Decimal("0.008"), Decimal(0)))
        self.assertTrue(sync.wait_durable(r.ledger_seq))

    def test_an_exception_inside_the_block_releases_the_hold(self) -> None:
        async def failing_call() -> None:
            async with tokenfuse.reserve("leak", "gpt-4o", 1000):
                raise ConnectionError("provider down")

        with self.assertRaises(ConnectionError):
            asyncio.run(failing_call())
        u = tokenfuse.tenant_usage("leak")
        self.assertEqual((u["used_usd"], u["reserved_usd"]), (Decimal(0), Decimal(0)))

    def test_streaming_charge_stops_the_stream_when_the_budget_is_spent(self) -> None:
        received = 0
        with tokenfuse.reserve("stream", "gpt-4o", 1000, run_id="run-1") as r:   # run-1: $0.03
            r.charge(prompt_tokens=1000, completion_tokens=0)   # the prompt is spent when the stream starts
            with self.assertRaises(tokenfuse.BudgetExhaustedError) as e:
                for _ in range(100):
                    r.charge(completion_tokens=100)   # $0.0015 a chunk
                    received += 100
            self.assertEqual(e.exception.error_code, "E-BUDGET-001")
            cost = r.commit("openai", 1000, received)
        self.assertLessEqual(cost, Decimal("0.03"))
        self.assertEqual(received, 1600)   # 0.005 + 16 x 0.0015 = 0.029; one more chunk would pass $0.03

    def test_a_stream_stopped_by_its_budget_inside_with_books_what_was_received(self) -> None:
        with self.assertRaises(tokenfuse.BudgetExhaustedError):
            with tokenfuse.reserve("stream2", "gpt-4o", 1000, run_id="run-2", provider="openai") as r:   # $0.03
                r.charge(prompt_tokens=1000, completion_tokens=0)
                while True:
                    r.charge(completion_tokens=100)
        u = tokenfuse.tenant_usage("stream2")
        self.assertEqual((u["used_usd"], u["reserved_usd"]), (Decimal("0.029"), Decimal(0)))
        self.assertTrue(wait_for(lambda: len(agent.ledger("stream2")) == 1))
        self.assertEqual(agent.ledger("stream2")[0]["completion_tokens"], 1600)

    def test_budget_rules_refuse_with_their_codes_and_tags_select_them(self) -> None:
        # Two requests a month for calls tagged py-batch (a month: a test never spans its end):
        # the third is refused, as a rate.
        for _ in range(2):
            with tokenfuse.reserve("acme", "gpt-4o", 10, tags=["py-batch", "other"]) as r:
                r.commit("openai", 10, 0)
        with self.assertRaises(tokenfuse.RateLimitedError) as e:
            sync.reserve("acme", "gpt-4o", 10, tags="py-batch")
        self.assertEqual(e.exception.error_code, "E-RATE-001")
        self.assertEqual(e.exception.rule, 1)
        self.assertGreater(e.exception.resets_unix_ns, time.time_ns())
        self.assertIsInstance(e.exception, tokenfuse.BudgetExhaustedError)
        with self.assertRaises(tokenfuse.RateLimitedError):
            sync.check_budget_before_llm_call("acme", "gpt-4o", 10, tags="py-batch")
        sync.check_budget_before_llm_call("acme", "gpt-4o", 10)   # untagged: not counted by it
        # $0.01 a month for the agent py-agent: the check sees the agent, the record counts it.
        sync.record_token_usage(project_id="acme", model="gpt-4o", provider="openai", prompt_tokens=2000,
                                completion_tokens=0, agent_id="py-agent")
        with self.assertRaises(tokenfuse.BudgetExhaustedError) as e:
            sync.check_budget_before_llm_call("acme", "gpt-4o", 1, agent_id="py-agent")
        self.assertEqual(e.exception.error_code, "E-BUDGET-006")
        sync.check_budget_before_llm_call("acme", "gpt-4o", 1, agent_id="someone-else")

    def test_estimates_may_be_floats_and_round_up(self) -> None:
        with tokenfuse.reserve("floaty", "gpt-4o", 1000 * 1.5) as r:
            self.assertEqual(r.reserved_usd, Decimal("0.0075"))
        sync.check_budget_before_llm_call("floaty", "gpt-4o", 4000 * 1.5)
        with self.assertRaises(ValueError):
            sync.check_budget_before_llm_call("floaty", "gpt-4o", float("nan"))

    def test_200_concurrent_reservations_against_one_dollar_spend_at_most_one_dollar(self) -> None:
        passed = []
        barrier = threading.Barrier(50)

        def worker() -> None:
            barrier.wait()
            for _ in range(4):
                try:
                    with tokenfuse.reserve("acme-race", "gpt-4o", 8400) as r:   # $0.042 each
                        r.commit("openai", 8400, 0)
                        passed.append(1)
                except tokenfuse.BudgetExhaustedError:
                    pass

        threads = [threading.Thread(target=worker) for _ in range(50)]
        subprocess.run([os.environ["TOKENFUSE_CLI"], "--shm-name", SHM, "limit", "set", "acme-race", "1.00",
                        "--data-dir", agent.dir + "/state"], check=True, capture_output=True)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(passed), 23)
        self.assertEqual(tokenfuse.tenant_usage("acme-race")["used_usd"], Decimal("0.966"))

    def test_four_processes_share_the_limit_exactly(self) -> None:
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        procs = [ctx.Process(target=reserve_in_child, args=(50, q)) for _ in range(4)]
        subprocess.run([os.environ["TOKENFUSE_CLI"], "--shm-name", SHM, "limit", "set", "race", "1.00",
                        "--data-dir", agent.dir + "/state"], check=True, capture_output=True)
        for p in procs:
            p.start()
        total = sum(q.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        self.assertEqual(total, 23)
        self.assertEqual(tokenfuse.tenant_usage("race")["used_usd"], Decimal("0.966"))


FULL_CONFIG = """
[agent]
shm_name = "{shm}"
data_dir = "{dir}/state"
tick_ms = 50
[http]
listen = "127.0.0.1:0"
[region]
tenant_capacity = 16
[budgets]
tenant_default_daily_limit_usd = "1.00"
"""


class FullTenantTable(unittest.TestCase):
    """A tenant table with no room left: a new tenant with a default limit is refused, not let through."""

    def test_a_tenant_that_cannot_be_tracked_is_refused_and_its_record_is_booked_once(self) -> None:
        data_dir = os.environ["TOKENFUSE_DATA_DIR"]   # the module's agent's, for the other tests
        other = Agent("tfpy-full-" + uuid.uuid4().hex[:8], FULL_CONFIG)
        try:
            tokenfuse.configure(shm_name=other.shm)
            for i in range(200):
                sync.record_token_usage(project_id=f"t{i}", model="gpt-4o", provider="openai", prompt_tokens=1,
                                        completion_tokens=0)
            with self.assertRaises(tokenfuse.TokenfuseError) as e:
                sync.check_budget_before_llm_call("newcomer", "gpt-4o")
            self.assertEqual(e.exception.error_code, "E-TOKENFUSE-CAPACITY")
            with self.assertLogs("tokenfuse", level="ERROR") as logs:
                cost = sync.record_token_usage(project_id="newcomer", model="gpt-4o", provider="openai",
                                               prompt_tokens=1000, completion_tokens=0)
            self.assertEqual(cost, Decimal("0.005"))
            self.assertIn("token_usage_untracked", "\n".join(logs.output))
            self.assertTrue(wait_for(lambda: len(other.ledger("newcomer")) == 1))
        finally:
            tokenfuse.configure(shm_name=SHM)
            os.environ["TOKENFUSE_DATA_DIR"] = data_dir
            other.stop()


class WithoutAnAgent(unittest.TestCase):
    def tearDown(self) -> None:
        tokenfuse.configure(shm_name=SHM, fail_open=True)

    def test_fails_open_by_default_as_the_reference_does(self) -> None:
        tokenfuse.configure(shm_name="tfpy-no-such-region")
        with self.assertLogs("tokenfuse", level="WARNING"):
            asyncio.run(tokenfuse.check_budget_before_llm_call("acme", "gpt-4o"))
        self.assertEqual(sync.record_token_usage(project_id="acme", model="gpt-4o", provider="openai",
                                                 prompt_tokens=1000, completion_tokens=0), Decimal("0.005"))
        self.assertFalse(sync.is_emergency_kill_active())

    def test_fails_closed_when_asked(self) -> None:
        tokenfuse.configure(shm_name="tfpy-no-such-region-2", fail_open=False)
        with self.assertRaises(tokenfuse.TokenfuseUnavailableError) as e:
            sync.check_budget_before_llm_call("acme", "gpt-4o")
        self.assertIn("does not exist: start tokenfused", str(e.exception))
        with self.assertRaises(tokenfuse.TokenfuseUnavailableError):
            asyncio.run(tokenfuse.check_emergency_kill())

    def test_estimate_cost_is_the_same_with_and_without_an_agent(self) -> None:
        cases = [(1000, 500, "gpt-4o"), (10, 10, "ollama/llama3"), (10, 10, "unknown-model"), (7, 0, "qwen3:8b")]
        attached = [tokenfuse.estimate_cost(*c) for c in cases]
        tokenfuse.configure(shm_name="tfpy-no-such-region-3")
        self.assertEqual([tokenfuse.estimate_cost(*c) for c in cases], attached)
        for bad in ("", "m" * 129):
            with self.assertRaises(ValueError):
                tokenfuse.estimate_cost(1, 1, bad)


if __name__ == "__main__":
    unittest.main(verbosity=2)
