"""PersonaRecord: the one schema every data source produces and everything downstream consumes."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from perce_ds.errors import UserError


class RecordError(UserError, ValueError):
    """A record that cannot be used. The message names the file, the record and the field."""

    def __init__(self, source: str, where: str, field_name: str, problem: str, hint: str = ""):
        self.source, self.where, self.field_name, self.problem = source, where, field_name, problem
        msg = f"{source}, {where}, field '{field_name}': {problem}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


@dataclass
class PersonaRecord:
    user_id: str
    task: str
    query: str
    response: str
    profile: list[dict[str, Any]]
    record_id: str = ""
    # Ground truth where it is known (the synthetic task): character spans [start, end) of the
    # response that only the profile can predict.
    persona_spans: list[list[int]] = field(default_factory=list)
    # Optional, one per span: what kind of persona token it is (the natural synthetic task: "copy" for a
    # value stated in the profile, "infer" for one only implied by it), so evaluations can report them apart.
    persona_span_kinds: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.persona_span_kinds:
            del out["persona_span_kinds"]  # files of tasks without kinds stay as they were
        return out


REQUIRED_STR_FIELDS = ("user_id", "task", "query", "response")
SKIP_HINT = "fix the record, or set data.on_bad_record=skip to drop such records with a count"


def json_value(value: Any, source: str, where: str, field_name: str) -> Any:
    """`value` as plain JSON data (dict / list / str / int / float / bool / None), so records survive
    json.dumps (the tokenised cache) and render as text in prompts.

    Readers hand over more than JSON: Arrow turns "YYYY-MM-DD" strings of a JSON file into datetimes
    (LaMP-4's item dates), Parquet and pandas give numpy scalars and arrays. Dates become ISO text (a
    datetime at midnight without a time zone as the date alone, which is what such a file held), numpy
    values their Python equivalents; anything else raises RecordError naming the field.
    """
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): json_value(v, source, where, f"{field_name}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v, source, where, f"{field_name}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dt.datetime):
        if value.tzinfo is None and value.time() == dt.time(0):
            return value.date().isoformat()
        return value.isoformat()
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):  # numpy scalars and arrays alike
        return json_value(value.tolist(), source, where, field_name)
    if isinstance(value, bytes):
        raise RecordError(source, where, field_name, "binary data cannot be shown in a prompt", SKIP_HINT)
    raise RecordError(
        source, where, field_name, f"unsupported value type {type(value).__name__} (expected JSON data)", SKIP_HINT
    )


def record_from_dict(raw: Any, source: str, where: str, require_response: bool = True) -> PersonaRecord:
    """Validate one raw mapping into a PersonaRecord or raise RecordError naming source/where/field.

    `require_response=False` reads a prediction-only split (a benchmark's test questions without outputs):
    a missing response becomes "" (no reference), and such records can only be generated for.
    """
    if not isinstance(raw, dict):
        raise RecordError(source, where, "<record>", f"expected a JSON object, got {type(raw).__name__}", SKIP_HINT)
    if not require_response and raw.get("response") is None:
        raw = {**raw, "response": ""}
    for name in REQUIRED_STR_FIELDS:
        if name not in raw or raw[name] is None:
            raise RecordError(source, where, name, "missing", SKIP_HINT)
    values: dict[str, Any] = {}
    for name in REQUIRED_STR_FIELDS:
        value = raw[name]
        if isinstance(value, (int, float)) and name == "user_id":
            value = str(value)
        if not isinstance(value, str):
            raise RecordError(source, where, name, f"expected a string, got {type(value).__name__}", SKIP_HINT)
        values[name] = value
    if require_response and not values["response"].strip():
        raise RecordError(source, where, "response", "empty: nothing to train on", SKIP_HINT)
    if not values["query"].strip():
        raise RecordError(source, where, "query", "empty", SKIP_HINT)
    profile = raw.get("profile")
    if profile is None:
        raise RecordError(source, where, "profile", "missing (use [] for a user with no profile)", SKIP_HINT)
    if hasattr(profile, "tolist") and not isinstance(profile, list):  # numpy arrays from Parquet
        profile = profile.tolist()
    if not isinstance(profile, list):
        raise RecordError(
            source, where, "profile", f"expected a list of objects, got {type(profile).__name__}", SKIP_HINT
        )
    for i, item in enumerate(profile):
        if not isinstance(item, dict):
            raise RecordError(
                source, where, f"profile[{i}]", f"expected an object, got {type(item).__name__}", SKIP_HINT
            )
    spans = raw.get("persona_spans") or []
    if hasattr(spans, "tolist"):
        spans = spans.tolist()
    spans = [list(s.tolist() if hasattr(s, "tolist") else s) for s in spans]
    for i, span in enumerate(spans):
        if len(span) != 2 or not 0 <= span[0] <= span[1] <= len(values["response"]):
            raise RecordError(
                source, where, f"persona_spans[{i}]", f"{span} is not a [start, end) span of the response"
            )
    kinds = raw.get("persona_span_kinds") or []
    if hasattr(kinds, "tolist"):
        kinds = kinds.tolist()
    if kinds and (len(kinds) != len(spans) or not all(isinstance(k, str) and k for k in kinds)):
        raise RecordError(
            source, where, "persona_span_kinds",
            f"expected one non-empty string per persona span ({len(spans)}), got {kinds!r}",
            "give one kind per span, or leave persona_span_kinds out",
        )  # fmt: skip
    record_id = raw.get("record_id")
    return PersonaRecord(
        profile=[json_value(dict(item), source, where, f"profile[{i}]") for i, item in enumerate(profile)],
        record_id=str(record_id) if record_id not in (None, "") else where,
        persona_spans=[[int(a), int(b)] for a, b in spans],
        persona_span_kinds=list(kinds),
        **values,
    )
