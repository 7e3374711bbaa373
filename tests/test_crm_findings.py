"""Issue 21, the CRM-user tester's findings: messy, edited spreadsheets through `bulk` and
`results`, as someone who read only the docs runs them. Each test runs the real command in a
subprocess against the emulator; the emulator's request log judges what was sent, and how often.
"""

from __future__ import annotations

import collections
import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from autocalls_async.testing import MockAutocalls
from tests.test_cli import TOKEN, Run, ThreadedServer, run_cli


@pytest.fixture
def emulator() -> Iterator[MockAutocalls]:
    with ThreadedServer(rate_limit=None, assistants=(123, 456)) as server:
        yield server


def env_for(server: MockAutocalls) -> dict[str, str]:
    return {"AUTOCALLS_API_TOKEN": TOKEN, "AUTOCALLS_BASE_URL": server.base_url}


def processed(server: MockAutocalls) -> collections.Counter[tuple[str, str]]:
    return collections.Counter(
        (str(record.body["customer_identifier"]), str(record.body["message"]))
        for record in server.requests
        if record.processed
    )


async def bulk(server: MockAutocalls, source: Path, out: Path, *options: str) -> Run:
    return await run_cli(
        *("bulk", str(source), "--out", str(out), "--rate-limit", "none", "--progress", "off"),
        *options,
        **env_for(server),
    )


async def results(*args: str) -> Run:
    return await run_cli("results", *args)


SHEET = "assistant_id,customer_identifier,message\n123,+14155550001,Hi\n123,+14155550002,Hi\n"


# -- 1. results -o OUT / -o INPUT ----------------------------------------------------------------


async def test_results_never_writes_over_its_input_or_out(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """`results IN OUT -o OUT` emptied OUT (the log that prevents double sends: the next run
    needed a new --out and resent everyone); `-o IN` emptied the sheet. Both are refused, also
    through a symlink or a hard link; a results file is written whole or not at all."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    source.write_text(SHEET)
    assert (await bulk(emulator, source, out)).code == 0
    kept_out, kept_in = out.read_bytes(), source.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(out)
    os.link(source, tmp_path / "hard.csv")
    for target in (out, source, tmp_path / "link.jsonl", tmp_path / "hard.csv"):
        run = await results(str(source), str(out), "-o", str(target))
        assert run.code == 2, run
        assert "nothing was written" in run.err and "results.csv" in run.err
        assert out.read_bytes() == kept_out and source.read_bytes() == kept_in
    rerun = await bulk(emulator, source, out)
    assert rerun.code == 0 and "2 skipped" in rerun.out, rerun
    assert max(processed(emulator).values()) == 1

    # bulk --out given a hard link of the input: refused, nothing sent.
    refused = await bulk(emulator, source, tmp_path / "hard.csv")
    assert refused.code == 2 and "must not be the input" in refused.err, refused
    assert source.read_bytes() == kept_in and len(emulator.requests) == 2

    # Written whole or not at all: an input refused half-way leaves the old results as they were.
    target = tmp_path / "results.csv"
    target.write_text("the old results\n")
    source.write_text(SHEET + "123,+14155550003\n")  # row 3 lacks a field: refused when read
    run = await results(str(source), str(out), "-o", str(target))
    assert run.code == 2 and "fields but the header has" in run.err, run
    assert target.read_text() == "the old results\n"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".results.csv")]


# -- 2, 3. results checks OUT against the input, as bulk does ------------------------------------


async def test_the_printed_results_command_carries_the_runs_options(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """The `results` command a summary printed left out --vars-from-columns and --delimiter:
    run as printed, it reported every row not_sent, exit 0. It carries them now; and results
    run without them is refused (exit 2), naming the option."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    source.write_text(
        "assistant_id;customer_identifier;message;customer_name\n"
        "123;+14155550001;Hi;Ann\n999;+14155550002;Hi;Bob\n"
    )
    run = await bulk(emulator, source, out, "--delimiter", ";", "--vars-from-columns")
    assert run.code == 1, run  # assistant 999 does not exist
    printed = run.out.split("Every row with its result: ", 1)[1].splitlines()[0]
    assert "--delimiter ';'" in printed and "--vars-from-columns" in printed, printed
    words = printed.split()[1:]
    assert words[0] == "results"
    as_printed = await run_cli(*[w.strip("'") for w in words], "--format", "jsonl")
    assert as_printed.code == 0, as_printed
    statuses = [json.loads(line)["status"] for line in as_printed.out.splitlines()]
    assert statuses == ["answered", "failed"]

    forgot = await results(str(source), str(out), "--delimiter", ";")
    assert forgot.code == 2 and forgot.out == "", forgot
    assert "run results again with --vars-from-columns" in forgot.err


async def test_results_refuses_a_missing_or_foreign_out(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """A mistyped OUT path, or another day's OUT, gave "all not_sent", exit 0. A missing OUT
    is refused (exit 2); an OUT none of whose lines is a row of the input is refused (exit 2,
    its lines named) unless --allow-foreign."""
    monday, tuesday, out = tmp_path / "monday.csv", tmp_path / "tuesday.csv", tmp_path / "o.jsonl"
    monday.write_text(SHEET)
    tuesday.write_text(
        "assistant_id,customer_identifier,message\n123,+14155550008,Bye\n123,+14155550009,Bye\n"
    )
    assert (await bulk(emulator, monday, out)).code == 0
    typo = await results(str(monday), str(tmp_path / "o.json"))
    assert typo.code == 2 and "does not exist" in typo.err and typo.out == "", typo
    foreign = await results(str(tuesday), str(out))
    assert foreign.code == 2 and foreign.out == "", foreign
    assert "does not belong to tuesday.csv" in foreign.err
    assert "line 1: the 1st row when written (assistant 123, customer +14155550001)" in foreign.err
    anyway = await results(str(tuesday), str(out), "--allow-foreign", "--format", "jsonl")
    assert anyway.code == 0, anyway
    assert [json.loads(line)["status"] for line in anyway.out.splitlines()] == ["not_sent"] * 2


# -- 4. results after a typo fix: edited_since_sent, never a silent not_sent ---------------------


async def test_results_marks_rows_edited_since_they_were_answered(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """After a typo fix in answered rows (a variable, a message), results showed them not_sent
    without a word. They are edited_since_sent with the earlier reply; OUT's lines are listed
    with what differs; exit 1 (--allow-foreign: 0)."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    header = "assistant_id,customer_identifier,message,customer_name\n"
    rows = ["123,+14155550001,Offer: 20% off,Ann", "123,+14155550002,Offer: 20% off,Bob"]
    rows.append("123,+14155550003,Offer: 20% off,Cy")
    source.write_text(header + "\n".join(rows) + "\n")
    assert (await bulk(emulator, source, out, "--vars-from-columns")).code == 0
    rows[0] = rows[0].replace("Ann", "Anne")
    rows[1] = rows[1].replace("20%", "25%")
    source.write_text(header + "\n".join(rows) + "\n")
    run = await results(str(source), str(out), "--vars-from-columns", "--format", "jsonl")
    assert run.code == 1, run
    got = [json.loads(line) for line in run.out.splitlines()]
    assert [row["status"] for row in got] == ["edited_since_sent", "edited_since_sent", "answered"]
    assert got[0]["reply"] == "Hi Ann! Thanks for your message: Offer: 20% off"
    assert "edited since line" in got[1]["error"]
    assert "2 answered or sent lines for rows that are not in in.csv" in run.err
    assert "now row 2 of in.csv" in run.err and "now row 3 of in.csv" in run.err
    accepted = await results(str(source), str(out), "--vars-from-columns", "--allow-foreign")
    assert accepted.code == 0, accepted
    assert max(processed(emulator).values()) == 1


# -- 9. results during a run ---------------------------------------------------------------------


async def test_results_during_a_run_says_it_is_a_snapshot(tmp_path: Path) -> None:
    """results while a bulk run held OUT printed rows in flight as maybe_processed with no
    word; it says a run is writing OUT and what in-flight rows look like (exit 0)."""
    import asyncio

    from tests.test_cli import start_cli

    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    source.write_text(
        "assistant_id,customer_identifier,message\n"
        + "".join(f"123,+1415555{n:04d},Hi\n" for n in range(6))
    )
    with ThreadedServer(rate_limit=None, reply_delay=3.0) as server:
        process = await start_cli(
            *("bulk", str(source), "--out", str(out), "--rate-limit", "none"),
            *("--progress", "off"),
            **env_for(server),
        )
        async with asyncio.timeout(20):
            while b'"sending":true' not in (out.read_bytes() if out.exists() else b""):
                await asyncio.sleep(0.05)
        during = await results(str(source), str(out))
        await process.communicate()
    assert during.code == 0, during
    assert "a bulk run is writing" in during.err and "maybe_processed" in during.err
    after = await results(str(source), str(out))
    assert after.code == 0 and "a bulk run is writing" not in after.err, after


# -- 10, 11. the refusal after an edit names the edited row and what differs ---------------------


async def test_the_refusal_after_an_edit_names_the_edited_row_and_what_differs(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """Only row 5 was edited, and the refusal said "row 1 has this customer with another
    message"; an invisible edit (LF to CRLF inside a quoted message) got the same unexplained
    refusal. The edited row is named, and an invisible edit is said as such."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    rows = [
        ["123", "+14155550001", "Hi Ann - reminder 1"],
        ["123", "+14155550002", "Hi Bob - reminder 1"],
        ["123", "+14155550001", "Hi Ann - reminder 2"],
        ["123", "+14155550002", "Hello,\nline two"],
        ["123", "+14155550001", "Hi Ann - reminder 3"],
    ]

    def write(rows: list[list[str]]) -> None:
        with source.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file, lineterminator="\n")
            writer.writerow(["assistant_id", "customer_identifier", "message"])
            writer.writerows(rows)

    write(rows)
    assert (await bulk(emulator, source, out)).code == 0
    edited = [list(row) for row in rows]
    edited[4][2] = "Hi Ann - reminder THREE"
    write(edited)
    run = await bulk(emulator, source, out, "--dry-run")
    assert run.code == 2, run
    assert (
        "the 5th row when written (assistant 123, customer +14155550001): row 6 of the input"
        in run.err
    )
    assert "row 1 has this customer" not in run.err

    resaved = [list(row) for row in rows]
    resaved[3][2] = "Hello,\r\nline two"
    write(resaved)
    run = await bulk(emulator, source, out, "--dry-run")
    assert run.code == 2, run
    assert "row 5 of the input" in run.err and "line endings inside its message differ" in run.err
    assert max(processed(emulator).values()) == 1


# -- 8. columns without a header name ------------------------------------------------------------


async def test_columns_without_a_name_are_named_and_never_lost(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """Two columns with empty header names (Excel's trailing ,,): results.csv lost one. They
    are named column_N by position, both kept in results, never sent, and the run says so."""
    source, out, target = tmp_path / "in.csv", tmp_path / "out.jsonl", tmp_path / "results.csv"
    source.write_text("assistant_id,customer_identifier,message,,\n123,+14155550001,Hi,x,y\n")
    run = await bulk(emulator, source, out, "--vars-from-columns")
    assert run.code == 0, run
    assert "without a name in the header hold values: column_4, column_5" in run.out
    assert [record.body.get("variables") for record in emulator.requests] == [None]
    done = await results(str(source), str(out), "--vars-from-columns", "-o", str(target))
    assert done.code == 0, done
    table = list(csv.DictReader(target.read_text(encoding="utf-8").splitlines()))
    assert table[0]["column_4"] == "x" and table[0]["column_5"] == "y"


# -- 13. phone numbers in results.csv ------------------------------------------------------------


async def test_results_csv_keeps_phone_numbers_and_neutralises_formulas(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """results.csv wrote +14155550001 as '+14155550001: it could not be matched back to the
    CRM. A phone number is kept as it is; real formulas are still neutralised."""
    source, out, target = tmp_path / "in.csv", tmp_path / "out.jsonl", tmp_path / "results.csv"
    source.write_text(
        "assistant_id,customer_identifier,message,note\n"
        '123,+14155550001,Hi,"+1 (415) 555-0002"\n'
        "123,+14155550003,=1+2,+1-1\n"
        '123,+14155550004,"+SUM(A1)","-2+3+cmd|\' /C calc\'!A0"\n'
        "123,+14155550005,@x,\tx\n"
    )
    assert (await bulk(emulator, source, out)).code == 0
    run = await results(str(source), str(out), "-o", str(target))
    assert run.code == 0, run
    table = list(csv.DictReader(target.read_text(encoding="utf-8").splitlines()))
    assert [row["customer_identifier"] for row in table] == [
        "+14155550001",
        "+14155550003",
        "+14155550004",
        "+14155550005",
    ]
    assert table[0]["note"] == "+1 (415) 555-0002"
    assert [row["message"] for row in table[1:]] == ["'=1+2", "'+SUM(A1)", "'@x"]
    assert table[1]["note"] == "'+1-1"  # two digits: not a phone number
    assert table[2]["note"].startswith("'-2+3+cmd|")
    assert table[3]["note"] == "'\tx"


# -- 5. --vars-from-columns: the header's spelling; the variables cell wins ----------------------


async def test_columns_are_sent_as_the_header_spells_them_and_old_outs_still_match(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """--vars-from-columns sent FirstName as firstname, and a variables cell did not win over
    a column of the same name (both were sent). The header's spelling is sent, the variables
    cell wins, the dry run says so; an OUT written by an older version (lower-cased names in
    the key) still matches: nothing is sent again."""
    from autocalls_async._bulkio import content_number, line_of
    from autocalls_async.bulk import BulkRequest

    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    source.write_text(
        "assistant_id,customer_identifier,message,variables,FirstName,Plan\n"
        '123,+14155550001,Hi,"{""FirstName"": ""Ann""}",Annie,Gold\n'
        "123,+14155550002,Hi,,Bob,Silver\n"
    )
    dry = await bulk(emulator, source, out, "--vars-from-columns", "--dry-run")
    assert dry.code == 0, dry
    assert "sent as variables: FirstName, Plan (named as the header spells them" in dry.out
    assert "the variables cell wins" in dry.out
    # Row 2 answered by an older version, which keyed (and sent) lower-cased names.
    old = BulkRequest(2, 123, "+14155550002", "Hi", {"firstname": "Bob", "plan": "Silver"}, 2)
    key = f"{content_number(old):016x}.1"
    line = {"id": 2, "ok": True, "key": key, "row": 2, "assistant_id": 123}
    line |= {"customer_identifier": "+14155550002", "conversation_id": "c", "reply": "r"}
    out.write_bytes(line_of(line) + b"\n")
    run = await bulk(emulator, source, out, "--vars-from-columns")
    assert run.code == 0 and "1 answered, 0 failed, 1 skipped" in run.out, run
    assert [record.body["variables"] for record in emulator.requests] == [
        {"FirstName": "Ann", "Plan": "Gold"}
    ]


# -- 14. the smaller findings --------------------------------------------------------------------


async def test_jsonl_results_keep_every_field_as_a_column(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """A JSONL input whose first line has no variables: results.csv dropped the variables
    of the later lines (its columns were the first line's)."""
    source, out, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "res.csv"
    lines = [
        {"assistant_id": 123, "customer_identifier": "+14155550001", "message": "a"},
        {"assistant_id": 123, "customer_identifier": "+14155550002", "message": "b"}
        | {"variables": {"n": 1}, "status": "vip"},
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert (await bulk(emulator, source, out)).code == 0
    run = await results(str(source), str(out), "-o", str(target))
    assert run.code == 0, run
    table = list(csv.DictReader(target.read_text(encoding="utf-8").splitlines()))
    assert table[1]["variables"] == '{"n": 1}' and table[1]["status"] == "vip"
    assert [row["result_status"] for row in table] == ["answered", "answered"]


async def test_a_401_names_the_token_file_and_the_summary_says_stopped(tmp_path: Path) -> None:
    """A 401 with --token-file hinted "check AUTOCALLS_API_TOKEN"; the summary said "Done"
    after stopping on it (and on --max-replies)."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    source.write_text(SHEET)
    token_file = tmp_path / "token.txt"
    token_file.write_text("not-the-token\n")
    token_file.chmod(0o600)
    with ThreadedServer(rate_limit=None, tokens=[TOKEN]) as server:
        run = await run_cli(
            *("bulk", str(source), "--out", str(out), "--rate-limit", "none"),
            *("--progress", "off", "--token-file", str(token_file)),
            AUTOCALLS_BASE_URL=server.base_url,
        )
        assert run.code == 3, run
        assert f"check the token in --token-file {token_file}" in run.out
        assert "AUTOCALLS_API_TOKEN" not in run.out
        assert run.out.startswith("Stopped: UNAUTHENTICATED received in"), run.out
        capped = await bulk(server, source, out, "--max-replies", "1")
        assert capped.code == 9 and capped.out.startswith("Stopped: --max-replies reached in")


async def test_a_cp1252_file_is_named_by_line_with_how_to_save_it(tmp_path: Path) -> None:
    """A file saved as cp1252 was refused with "invalid continuation byte at byte 79"."""
    source = tmp_path / "in.csv"
    text = "assistant_id,customer_identifier,message\n123,+14155550001,Hi\n"
    source.write_bytes((text + "123,+14155550002,Zoë\n").encode("cp1252"))
    run = await run_cli("bulk", str(source), "--out", str(tmp_path / "o.jsonl"), "--dry-run")
    assert run.code == 2, run
    assert "line 3: byte 20 is not UTF-8" in run.err and "CSV UTF-8" in run.err


# -- 6. --e164: every spelling normalised or refused, none left as it was ------------------------


async def test_e164_reads_tel_and_full_width_and_refuses_extensions_and_excel_numbers(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """--e164 US sent tel:+1..., full-width ＋1..., numbers with an extension or a label and
    Excel's 1.4155551234E+10 as they were, silently. tel: and full-width are normalised; the
    others fail as INVALID_ROW saying why and how to fix them."""
    pytest.importorskip("phonenumbers")
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    spellings = [
        "tel:+14155551234",
        "＋１４１５５５５１２３４",
        "(415) 555-1234 x22",
        "+1 415 555 1234 ext. 22",
        "+1 (415) 555-1234 (mobile)",
        "1.4155551234E+10",
    ]
    with source.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["assistant_id", "customer_identifier", "message"])
        writer.writerows([123, spelling, f"msg {n}"] for n, spelling in enumerate(spellings))
    run = await bulk(emulator, source, out, "--e164", "US")
    assert run.code == 1, run
    assert sorted(str(r.body["customer_identifier"]) for r in emulator.requests) == [
        "+14155551234",
        "+14155551234",
    ]
    errors = {
        line["row"]: line["error"]
        for line in map(json.loads, out.read_text().splitlines())
        if line.get("ok") is False
    }
    assert "has an extension" in errors[3] and "has an extension" in errors[4]
    assert "label after the number" in errors[5]
    assert "scientific notation" in errors[6] and "Format the column as Text" in errors[6]
