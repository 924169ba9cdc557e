"""What the fuzzers share: Hypothesis profiles, outcome counts, their summary.

Two settings profiles, registered here and applied per test (so loading
them changes nothing for the suite's other Hypothesis tests):

    fuzz-quick  the default: about 150 examples per test, part of `make test`
    fuzz-long   PYLGUEST_FUZZ=long: tens of thousands per test (`make fuzz`)

(each test says how many examples it runs in each, with fuzz_test).

Neither has a Hypothesis deadline: a case's time is bounded by the test
itself (CASE_SECONDS, checked on every case), which on two shared cores is
a better-defined bound than Hypothesis's per-example deadline.

Every case a fuzzer runs is counted by device and outcome (`record`), and
tests/conftest.py prints the counts in pytest's terminal summary
(`summary_lines`).
"""

import os
import resource
from collections import Counter, defaultdict

import pytest
from hypothesis import HealthCheck, settings

LONG = os.environ.get("PYLGUEST_FUZZ") == "long"
CASE_SECONDS = 10.0           # the bound on one case's run (generation not included)
RSS_GROWTH_LIMIT = 64 << 20   # the bound on a whole test's peak-RSS growth

for _name in ("fuzz-quick", "fuzz-long"):
    settings.register_profile(
        _name, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = "fuzz-long" if LONG else "fuzz-quick"


LONG_BATCH = 500                  # examples per Hypothesis run in the long profile


def fuzz_test(quick, long, batch=LONG_BATCH):
    """Decorator for a fuzz test (put it above @given): `quick` examples, or
    with PYLGUEST_FUZZ=long `long` examples in batches of `batch`, each a
    pytest parameter `batch` and a Hypothesis run of its own.  One run
    caches up to 10,000 of the examples it ran, some 35 KiB each for a ring
    case: batches keep that bounded, and so the RSS check meaningful, and
    each within the suite's 60 s timeout."""
    batches = -(-long // batch) if LONG else 1
    examples = min(long, batch) if LONG else quick
    profile = settings(settings.get_profile(PROFILE), max_examples=examples)

    def apply(test):
        return pytest.mark.parametrize("batch", range(batches))(profile(test))
    return apply


# --- Outcome counts. -------------------------------------------------------------

COUNTS = defaultdict(Counter)     # {"block": {"served": 5123, ...}}
RULES = defaultdict(Counter)      # {"block": {"loop": 40, ...}}: the rules broken
SLOWEST = {}                      # {"block": (seconds, what)}


def record(device, outcome, seconds, what, rule=None):
    """One case of `device` ran to `outcome` in `seconds`, breaking `rule`."""
    COUNTS[device][outcome] += 1
    if rule:
        RULES[device][rule] += 1
    if seconds > SLOWEST.get(device, (0.0, ""))[0]:
        SLOWEST[device] = (seconds, what)


def summary_lines():
    lines = []
    for device, counts in sorted(COUNTS.items()):
        slowest, what = SLOWEST.get(device, (0.0, ""))
        outcomes = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
        rules = ", ".join(f"{name} {n}" for name, n in RULES[device].most_common())
        lines.append(f"{device}: {outcomes}; slowest case {slowest:.3f} s ({what})")
        if rules:                 # only the ring fuzzer names the rule a case broke
            lines.append(f"    rules broken: {rules}")
    total = sum(sum(c.values()) for c in COUNTS.values())
    if total:
        lines.append(f"{total} cases in all ({PROFILE} profile; a case may bound "
                     f"{CASE_SECONDS:.0f} s)")
    return lines


def peak_rss():
    """This process's peak resident set so far, in bytes (Linux: ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
