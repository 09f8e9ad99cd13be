"""A user's script that `make package` type-checks with `mypy --strict` against the
installed wheel (outside the source tree): the types are found (py.typed) and the
decorator keeps the guarded function's signature.  Each ``type: ignore`` below marks a
mistake mypy must report; ``--strict`` turns an ignore that is not needed into an error,
so a decorator that erased the types would fail this check."""

from __future__ import annotations

from cycles_lite import (
    AsyncCyclesClient,
    BudgetExceededError,
    CyclesClient,
    CyclesConfig,
    CyclesResponse,
    cycles,
    get_cycles_context,
)
from cycles_lite_server import LocalCyclesServer

client = CyclesClient(CyclesConfig(base_url="http://localhost:7878", api_key="k", tenant="acme"))


@cycles(estimate=lambda prompt, tokens: tokens * 10, action_kind="llm.completion",
        action_name="gpt-4o", client=client)
def ask(prompt: str, tokens: int) -> str:
    context = get_cycles_context()
    return f"{prompt} ({context.reservation_id if context else None})"


@cycles(estimate=100, action_kind="tool.call", action_name="search",
        client=AsyncCyclesClient(CyclesConfig.from_env()))
async def search(query: str) -> list[str]:
    return [query]


def main() -> None:
    with LocalCyclesServer(api_keys={"k": "acme"}) as server:
        print(server.url)
    answer: str = ask("hello", 100)
    wrong: int = ask("hello", 100)  # type: ignore[assignment]
    ask("hello", "100")  # type: ignore[arg-type]
    response: CyclesResponse = client.get_balances(tenant="acme")
    try:
        print(answer, wrong, response.status)
    except BudgetExceededError as exc:
        print(exc.retry_after_ms)


async def main_async() -> list[str]:
    hits = await search("cycles")
    await search(42)  # type: ignore[arg-type]
    return hits
