#!/usr/bin/env python3
"""A minimal Python application: the reference's interface, over the installed binding.

    python3 app.py [shm_name]       (TOKENFUSE_SHM names the region too)
"""
import os
import sys

if len(sys.argv) > 1:
    os.environ["TOKENFUSE_SHM"] = sys.argv[1]
os.environ.setdefault("TOKENFUSE_FAIL_OPEN", "0")   # an example should say when it cannot attach

from tokenfuse.sync import BudgetExhaustedError, check_budget_before_llm_call, record_token_usage, reserve


def main() -> int:
    try:
        check_budget_before_llm_call("example-app", "gpt-4o-mini", estimated_prompt_tokens=2000)
    except BudgetExhaustedError as e:
        print(f"refused: {e.error_code}: {e}")
        return 1
    # ... make the LLM call here, then book what it used:
    cost = record_token_usage(project_id="example-app", model="gpt-4o-mini", provider="openai",
                              prompt_tokens=1800, completion_tokens=420)
    # A streaming call holds its estimate and books what it received.
    with reserve("example-app", "gpt-4o-mini", run_id="example-run", estimated_prompt_tokens=2000) as r:
        r.commit("openai", prompt_tokens=1900, completion_tokens=300)
    print(f"booked two calls for example-app, the first for ${cost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
