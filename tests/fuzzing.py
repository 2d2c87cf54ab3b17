"""Hypothesis profiles and strategies of hostile input, shared by the `test_fuzz_*` files.

Two budgets: `ci` (the default, in `make test`) is derandomised, so every run tries the same
examples and a failure reproduces; `fuzz` (`make fuzz`) is random and far longer. Choose with
`HYPOTHESIS_PROFILE=fuzz`. Neither keeps an example database: nothing is written into the
repository, and a failure prints the example (and, under `fuzz`, the seed to reproduce it).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

# Hypothesis also caches (literals it found in our code, Unicode tables) under `.hypothesis/` in
# the working directory; keep that out of the checkout too.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "ztunnel-redirect-hypothesis")

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "3000")),
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEEP: int = 20_000
"""Nesting depth of the deepest documents tried: far past the interpreter's recursion limit,
yet only 40 KB."""

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
"""Any JSON value, a few levels deep."""


@st.composite
def deeply_nested(draw: st.DrawFn) -> bytes:
    """`[[[…]]]` or `{"a":{"a":…}}`, up to DEEP levels, closed or not."""
    depth = draw(st.sampled_from([50, 999, 1_001, 5_000, DEEP]))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    closed = draw(st.booleans())
    return (opener * depth + "1" + (closer * depth if closed else "")).encode()


def mutations_of(good: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """`good` with any of its keys dropped or given any JSON value, and keys added: a document
    close enough to valid to reach the checks past the parser."""
    fields = {
        key: st.one_of(st.just(value), json_values, st.just(None)) for key, value in good.items()
    }
    return st.builds(
        lambda kept, extra: {**{k: v for k, v in kept.items() if v is not None}, **extra},
        st.fixed_dictionaries(fields),
        st.dictionaries(st.text(max_size=8), json_values, max_size=2),
    )


def documents_around(good: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Bytes a peer could send where `good` is expected: mutations of it, any JSON, deep
    nesting, truncations, random bytes."""
    encoded = json.dumps(good).encode()
    return st.one_of(
        mutations_of(good).map(lambda doc: json.dumps(doc).encode()),
        json_values.map(lambda value: json.dumps(value).encode()),
        deeply_nested(),
        st.integers(min_value=0, max_value=len(encoded)).map(lambda n: encoded[:n]),
        st.binary(max_size=200),
    )
