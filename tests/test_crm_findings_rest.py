"""Issue 21, the CRM-user tester's findings left after the first round (6, 7, 12): phone-like
identifiers --e164 cannot write, a resume that changes a customer's spelling, and row numbers
as a spreadsheet shows them. Real commands in subprocesses against the emulator, whose request
log judges what was sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autocalls_async.testing import MockAutocalls
from tests.test_crm_findings import bulk, emulator, processed

__all__ = ["emulator"]

REMINDERS = (
    "assistant_id,customer_identifier,message\n"
    "123,415-555-0102,Reminder 1\n123,415-555-0103,Reminder 1\n"
    "123,415-555-0102,Reminder 2\n123,415-555-0103,Reminder 2\n"
)


def sent(server: MockAutocalls) -> list[tuple[str, str]]:
    return [
        (str(record.body["customer_identifier"]), str(record.body["message"]))
        for record in server.requests
    ]


# -- 7. a resume that changes a customer's spelling ----------------------------------------------


async def test_adding_e164_on_a_resume_is_refused_before_a_conversation_splits(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """A run stopped by --max-replies sent `415-555-0102 / Reminder 1`; the resume with
    --e164 US sent Reminder 2 to +14155550102, a new conversation, silently. The dry run and
    the run refuse (exit 2), naming the rows and OUT's lines, with the command that goes on in
    the old conversations; --allow-new-spelling accepts the split."""
    pytest.importorskip("phonenumbers")
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    source.write_text(REMINDERS)
    first = await bulk(emulator, source, out, "--max-replies", "2")
    assert first.code == 9, first
    for dry in ("--dry-run",), ():
        run = await bulk(emulator, source, out, "--e164", "US", *dry)
        assert run.code == 2 and run.out == "", run
        assert "2 customer(s) of this run were sent to before under another spelling" in run.err
        assert (
            "row 4 (assistant 123, customer 415-555-0102): would be sent as +14155550102; "
            "out.jsonl line 1: sent as 415-555-0102" in run.err
        )
        assert "row 5 (assistant 123, customer 415-555-0103)" in run.err
        assert "run again without --e164:" in run.err
        assert "add --allow-new-spelling" in run.err
    assert sent(emulator) == [("415-555-0102", "Reminder 1"), ("415-555-0103", "Reminder 1")]
    # The printed command goes on in the old conversations.
    command = run.err.split("run again without --e164:\n", 1)[1].splitlines()[0].split()
    assert "--e164" not in command and command[1] == "bulk"
    resumed = await bulk(emulator, source, out)
    assert resumed.code == 0, resumed
    assert sent(emulator)[2:] == [("415-555-0102", "Reminder 2"), ("415-555-0103", "Reminder 2")]
    assert max(processed(emulator).values()) == 1


async def test_dropping_e164_on_a_resume_is_refused_and_the_split_can_be_accepted(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """The reverse: a first run with --e164 US (OUT records what it sent: sent_as), a resume
    without it would send 415-555-0102 beside +14155550102. Refused, with the --e164 that goes
    on; resuming with --e164 US goes on in the same conversations; --allow-new-spelling sends
    the rest as written."""
    pytest.importorskip("phonenumbers")
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    source.write_text(REMINDERS)
    assert (await bulk(emulator, source, out, "--max-replies", "2", "--e164", "US")).code == 9
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {line.get("sent_as") for line in lines} == {"+14155550102", "+14155550103"}
    assert {line["customer_identifier"] for line in lines} == {"415-555-0102", "415-555-0103"}
    for dry in ("--dry-run",), ():
        run = await bulk(emulator, source, out, *dry)
        assert run.code == 2, run
        assert "would be sent as 415-555-0102; out.jsonl line 1: sent as +14155550102" in run.err
        assert "run again with the --e164 the earlier run had:" in run.err
        assert run.err.split("had:\n", 1)[1].splitlines()[0].endswith("--e164 US")
    assert len(emulator.requests) == 2
    accepted = await bulk(emulator, source, out, "--allow-new-spelling", "--max-replies", "1")
    assert accepted.code == 9, accepted
    assert sent(emulator)[2] == ("415-555-0102", "Reminder 2")
    same = await bulk(emulator, source, out, "--e164", "US")  # 0103's rows: one conversation
    assert same.code == 0, same
    assert sent(emulator)[3] == ("+14155550103", "Reminder 2")
    assert max(processed(emulator).values()) == 1


# -- 6. --e164: the phone numbers it does not write, and the spellings that still differ --------


async def test_e164_names_the_phone_numbers_it_did_not_write_and_spellings_still_apart(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """With --e164 US, an identifier with an extension, a label or in scientific notation
    failed as INVALID_ROW among other invalid rows, and one with a word after the number was
    sent as written, a conversation apart, without a note; the "written in several ways" note
    disappeared under --e164. The dry run and the run name those rows in a note, and the
    spellings that still differ once normalised."""
    pytest.importorskip("phonenumbers")
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    source.write_text(
        "assistant_id,customer_identifier,message\n"
        "123,+14155551234,a\n"
        "123,(415) 555-1234 x22,b\n"
        "123,+1 (415) 555-1234 (mobile),c\n"
        "123,1.4155551234E+10,d\n"
        "123,415.555.1234 mobile,e\n"
        "123,ann@example.com,f\n"
        "123,CRM-000123,g\n"
        "123,415-555-1234,h\n"
    )
    for options in (("--dry-run",), ()):
        run = await bulk(emulator, source, out, "--e164", "US", *options)
        assert run.code == 1, run
        assert (
            "4 identifier(s) hold a phone number that --e164 did not write in E.164: "
            "row 3 '(415) 555-1234 x22' (INVALID_ROW, never sent), "
            "row 4 '+1 (415) 555-1234 (mobile)' (INVALID_ROW, never sent), "
            "row 5 '1.4155551234E+10' (INVALID_ROW, never sent), "
            "row 6 '415.555.1234 mobile' (sent as written)"
        ) in run.out
        assert (
            "1 phone number(s) written in several ways, still after --e164, each way its own "
            "conversation: +14155551234 = 415.555.1234 mobile"
        ) in run.out
        assert "CRM-000123" not in run.out and "ann@" not in run.out
    assert sorted(customer for customer, _ in processed(emulator)) == [
        "+14155551234",
        "+14155551234",
        "415.555.1234 mobile",
        "CRM-000123",
        "ann@example.com",
    ]


# -- 12. "row N" is the row a spreadsheet shows ---------------------------------------------------

#: An OUT written by the version before row numbers became the spreadsheet's (generated with
#: it, for OLD_SHEET): ids, rows and keys are what they were, so it resumes with nothing resent.
OLD_SHEET = (
    'assistant_id,customer_identifier,message\n123,+14155550001,"Hello\nthere"\n,,\n\n'
    "123,+14155550002,Hi\n123,,missing customer\n123,+14155550003,Bye\n"
)
OLD_OUT = """\
{"id":3,"ok":false,"key":"54930e615c11a5f4.1","row":3,"error":"row 3: missing customer_identifier","error_code":"INVALID_ROW","error_type":"InvalidRequestError","status":null,"sent":false,"maybe_processed":false}
{"id":1,"sending":true,"key":"05f4d66f05f73c6a.1","row":1,"assistant_id":123,"customer_identifier":"+14155550001"}
{"id":1,"ok":true,"key":"05f4d66f05f73c6a.1","row":1,"assistant_id":123,"customer_identifier":"+14155550001","conversation_id":"c1","reply":"r1","function_calls":[],"ai_disabled":false}
{"id":2,"sending":true,"key":"eda4a38b3e0143be.1","row":2,"assistant_id":123,"customer_identifier":"+14155550002"}
{"id":4,"sending":true,"key":"50c4ca78c78cc128.1","row":4,"assistant_id":123,"customer_identifier":"+14155550003"}
{"id":4,"ok":true,"key":"50c4ca78c78cc128.1","row":4,"assistant_id":123,"customer_identifier":"+14155550003","conversation_id":"c4","reply":"r4","function_calls":[],"ai_disabled":false}
{"id":2,"ok":true,"key":"eda4a38b3e0143be.1","row":2,"assistant_id":123,"customer_identifier":"+14155550002","conversation_id":"c2","reply":"r2","function_calls":[],"ai_disabled":false}
"""  # noqa: E501


async def test_rows_are_named_as_a_spreadsheet_numbers_them(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """`row 3: missing customer_identifier` was spreadsheet row 7 (a header, a cell of three
    lines and blank rows came before it). Every message names the spreadsheet's row: the dry
    run's problems, OUT's INVALID_ROW errors, notes, the summary; a JSONL input's line."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    source.write_text(
        "assistant_id,customer_identifier,message\n"
        '123,+14155550001,"Hello\nthere\nfriend"\n'  # row 2 (lines 2-4)
        ",,\n\n"  # rows 3 and 4: blank
        "123,+14155550002,Hi\n"  # row 5
        ",,\n"  # row 6
        "123,,missing customer\n"  # row 7
        "123,+14155550003,Again\n123,+14155550003,Again\n"  # rows 8, 9: identical
        "999,+14155550004,Unknown assistant\n999,+14155550005,Skipped\n"  # rows 10, 11
    )
    dry = await bulk(emulator, source, out, "--dry-run")
    assert dry.code == 1, dry
    assert "    row 7: missing customer_identifier" in dry.out
    assert (
        "identical row(s) (same assistant, customer, message and variables), each sent as "
        "its own row: rows 8, 9" in dry.out
    )
    run = await bulk(emulator, source, out)
    assert run.code == 1, run
    assert "1 row invalid, never sent: row 7:" in run.out
    assert "rows 10, 11" in run.out  # the failed rows (ASSISTANT_NOT_FOUND, skipped)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    errors = {line["row"]: line["error"] for line in lines if line.get("ok") is False}
    assert errors[3] == "row 7: missing customer_identifier"  # OUT's row: as before
    assert "ASSISTANT_NOT_FOUND for row 10 of this run" in errors[7]

    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(
        '{"assistant_id": 123, "customer_identifier": "+14155550009", "message": "a"}\n\n'
        '{"assistant_id": 123, "message": "no customer"}\n{not json\n'
    )
    dry = await bulk(emulator, jsonl, tmp_path / "o2.jsonl", "--dry-run")
    assert dry.code == 1, dry
    assert "    row 3: missing customer_identifier" in dry.out
    assert "    row 4: not valid JSON" in dry.out


async def test_an_out_written_before_spreadsheet_rows_resumes_with_nothing_resent(
    emulator: MockAutocalls, tmp_path: Path
) -> None:
    """OUT's ids, rows and keys did not change: an OUT the earlier version wrote resumes
    with nothing sent again; the invalid row, retried, is named by its spreadsheet row."""
    source, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    source.write_text(OLD_SHEET)
    out.write_text(OLD_OUT)
    run = await bulk(emulator, source, out)
    assert run.code == 1 and "0 answered, 0 failed, 4 skipped" in run.out, run
    assert "row 6" in run.out  # the invalid row, as the spreadsheet numbers it
    assert emulator.requests == []
    retry = await bulk(emulator, source, out, "--retry-failed")
    assert retry.code == 1 and "0 answered, 1 failed, 3 skipped" in retry.out, retry
    assert emulator.requests == []
    last = json.loads(out.read_text().splitlines()[-1])
    assert last["row"] == 3 and last["error"] == "row 6: missing customer_identifier"
