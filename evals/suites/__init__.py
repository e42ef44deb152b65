"""The suites by name. A niah task name (e.g. niah_single_2, niah_grid) selects that task of the niah suite, a RULER task
name (vt, cwe, fwe, qa_1, qa_2) that task of the ruler suite, passkey_stuffed_mamba that passkey variant."""

from lctk.evals.suites.base import EvalContext, Job, Suite
from lctk.evals.suites.perplexity import PerplexitySuite
from lctk.evals.suites.recall_throughput import RecallThroughputSuite
from lctk.evals.suites.retrieval import NiahSuite, PasskeySuite, RulerSuite
from lctk.evals.suites.state_collapse import StateCollapseSuite

SUITES: dict[str, type[Suite]] = {
    suite.name: suite
    for suite in (PasskeySuite, NiahSuite, RulerSuite, StateCollapseSuite, RecallThroughputSuite, PerplexitySuite)
}

__all__ = ["SUITES", "EvalContext", "Job", "Suite"]
