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
            "row 3 (assistant 123, customer 415-555-0102): would be sent as +14155550102; "
            "out.jsonl line 1 (row 1): sent as 415-555-0102" in run.err
        )
        assert "row 4 (assistant 123, customer 415-555-0103)" in run.err
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
        assert (
            "would be sent as 415-555-0102; out.jsonl line 1 (row 1): sent as +14155550102"
            in run.err
        )
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
            "row 2 '(415) 555-1234 x22' (INVALID_ROW, never sent), "
            "row 3 '+1 (415) 555-1234 (mobile)' (INVALID_ROW, never sent), "
            "row 4 '1.4155551234E+10' (INVALID_ROW, never sent), "
            "row 5 '415.555.1234 mobile' (sent as written)"
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
