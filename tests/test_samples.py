"""The shared record validator: every record shape the trainer cannot use gets a stable reason."""

from __future__ import annotations

import pytest

from visalign.samples import check_record

IMG = "<image>"


def conv(*turns):
    return {"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns]}


@pytest.mark.parametrize(
    "meta,has_image",
    [
        (conv(("human", f"{IMG}\nWhat is it?"), ("gpt", "A cat.")), True),
        (conv(("human", "What is it?"), ("gpt", "A cat.")), True),  # no mark: visual tokens go first
        (conv(("human", f"Look: {IMG}"), ("gpt", "A cat."), ("human", "Colour?"), ("gpt", "Ginger.")), True),
        (conv(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello.")), False),  # text-only
        (conv(("human", "Hi"), ("gpt", "Hello."), ("human", "Bye")), False),  # a trailing question is fine
        ({"id": "c", "caption": "A cat on a sofa."}, True),
        ({"id": "c", "caption": ""}, True),
    ],
)
def test_usable_records(meta, has_image):
    assert check_record(meta, has_image) is None


@pytest.mark.parametrize(
    "meta,has_image,reason",
    [
        ({"id": "", "caption": "a"}, True, "missing or empty 'id'"),
        ({"id": "a\ud800", "caption": "a"}, True, "id is not valid Unicode"),
        ({"id": "a", "caption": "bad \ud800 text"}, True, "caption is not valid Unicode"),
        ({"id": "a"}, True, "neither 'conversations' nor a 'caption'"),
        ({"id": "a", "conversations": []}, True, "non-empty list"),
        (conv(("human", f"{IMG} hi")), True, "no assistant reply"),
        (conv(("robot", "hi"), ("gpt", "ok")), True, "unknown speaker 'robot'"),
        ({"id": "a", "conversations": [{"value": "hi"}, {"from": "gpt", "value": "ok"}]}, True, "no 'from'"),
        ({"id": "a", "conversations": [{"from": "human", "value": 3}]}, True, "no string 'value'"),
        (conv(("human", f"{IMG}{IMG} two"), ("gpt", "ok")), True, "2 '<image>' marks"),
        (
            conv(("human", f"{IMG} a"), ("gpt", "ok"), ("human", f"{IMG} b"), ("gpt", "ok")),
            True,
            "2 '<image>'",
        ),
        (conv(("human", "hi"), ("gpt", f"{IMG} ok")), True, "in a assistant turn"),
        (conv(("human", f"{IMG} hi"), ("gpt", "ok")), False, "text-only record with 1"),
        (conv(("gpt", "hi"), ("human", "ok")), True, "must alternate"),
        (conv(("human", "a"), ("human", "b"), ("gpt", "c")), True, "must alternate"),
        (conv(("human", "a\udcff"), ("gpt", "c")), True, "turn 0 is not valid Unicode"),
    ],
)
def test_unusable_records_name_the_reason(meta, has_image, reason):
    got = check_record(meta, has_image)
    assert got is not None and reason in got, got
    assert "\n" not in got and "0x" not in got  # one stable line, no object addresses
