"""The README's tables and documented defaults against the code, so that they cannot drift apart."""

from __future__ import annotations

import re

from reward_client import Retry, Timeout
from reward_client.cli import parser
from reward_server import metrics
from reward_server.errors import REJECTION_REASONS
from reward_server.settings import describe
from tests.live_server import REPO

README = (REPO / "README.md").read_text()
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def table_rows(heading: str) -> list[list[str]]:
    """The cells of the first table under `heading`, header and rule left out."""
    section = README.split(f"\n{heading}\n", 1)[1]
    lines = section[section.index("\n|") + 1 :].splitlines()
    rows = [line for line in lines[: next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))]]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]


def shown(value: object) -> str:
    """How the README writes a default."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) or "none"


def test_the_settings_table_is_the_settings():
    rows = {row[0].strip("`"): row for row in table_rows("## Settings")}
    assert list(rows) == [name for name, *_ in describe()], "README's settings table: add, remove or reorder rows"
    for name, env, default, _help, models in describe():
        _, documented_env, documented_default, documented_models, meaning = rows[name]
        assert documented_env == f"`{env}`", name
        assert documented_default == f"`{shown(default)}`", name
        assert documented_models == ", ".join(f"`{m}`" for m in models), name
        assert meaning, name


def test_every_setting_has_a_launcher_flag_in_help():
    from reward_server.launcher.serve import parser as server_parser

    flags = {option for action in server_parser()._actions for option in action.option_strings}
    assert {f"--{name.replace('_', '-')}" for name, *_ in describe()} <= flags


def test_the_documented_client_defaults_are_the_code():
    retry, timeout = Retry(), Timeout()
    documented = f"`retry=Retry(attempts={retry.attempts}, backoff={retry.backoff}, max_backoff={retry.max_backoff})`"
    assert documented in README
    assert f"waiting {retry.min_wait():g} s at\n  least and {2 * retry.min_wait():g} s at most" in README
    assert f"`timeout=Timeout(connect={timeout.connect}, request={timeout.request})`" in README
    client_doc = (REPO / "docs" / "client.md").read_text()
    assert f"Retry(attempts={retry.attempts}, backoff={retry.backoff}, max_backoff={retry.max_backoff})" in client_doc
    assert f"{retry.min_wait():g} s" in client_doc and f"{2 * retry.min_wait():g} s" in client_doc


def test_the_cli_uses_the_sdk_defaults():
    args = parser().parse_args(["score", "-"])
    assert args.retries == Retry().attempts
    assert (args.connect_timeout, args.timeout) == (Timeout().connect, Timeout().request)


def test_docs_name_no_moved_script():
    """The launcher and the benchmark moved (issue 11): no doc still sends a reader to the old paths."""
    for doc in DOCS:
        for old in ("build/serve.py", "tests/benchmark.py", "tests/soak.py", "build/supervisor.py", "build/tls_proxy.py"):
            assert not re.search(rf"(?<![\w/]){re.escape(old)}", doc.read_text()), (
                doc.name,
                old,
            )


def test_every_make_variable_in_the_docs_is_read_by_the_makefile():
    """`make serve ADMIN_KEY=...` would start a server that silently ignores the key: every VAR= a doc puts
    after a make target is one the Makefile uses."""
    makefile = (REPO / "Makefile").read_text()
    found = {
        (doc.name, variable)
        for doc in DOCS
        for command in re.findall(r"make [a-z]+((?: [A-Z_]+=\S*)+)", doc.read_text())
        for variable in re.findall(r" ([A-Z_]+)=", command)
    }
    assert found, "no documented make variable found: the pattern no longer matches the docs"
    unread = {(doc, variable) for doc, variable in found if f"$({variable})" not in makefile and f"$${{{variable}" not in makefile}
    assert not unread, unread


def test_the_documented_rejection_reasons_are_the_code():
    """docs/monitoring.md lists every value of reward_requests_rejected_total's `reason`, and no other."""
    row = next(line for line in (REPO / "docs" / "monitoring.md").read_text().splitlines() if line.startswith(f"| `{metrics.REJECTED}`"))
    values = re.sub(r"\([^()]*\)", "", row.split("`reason` ∈", 1)[1])  # each value's explanation dropped
    listed = re.findall(r"`(\w+)`", values)
    assert sorted(listed) == sorted(REJECTION_REASONS)
