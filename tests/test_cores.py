"""
Tests for L{sentry_tx.cores}: the default number of serving
processes, from fake cgroup files and a fake CPU affinity.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.cores import (
    MAX_DEFAULT_SERVING_PROCESSES,
    cgroup_path,
    default_serving_processes,
    parse_cpu_max,
)


class FakeCgroups:
    """
    A cgroup v2 tree and a C{/proc/self/cgroup} file under a test directory.
    """

    def __init__(self, test_case, own_path="/kubepods/pod1/sentry"):
        base = test_case.mktemp()
        self.root = os.path.join(base, "cgroup")
        self.proc_self_cgroup = os.path.join(base, "proc-self-cgroup")
        os.makedirs(os.path.join(self.root, *own_path.strip("/").split("/")))
        with open(self.proc_self_cgroup, "w") as f:
            f.write(f"0::{own_path}\n")

    def set_cpu_max(self, path, text):
        directory = os.path.join(self.root, *path.strip("/").split("/"))
        with open(os.path.join(directory, "cpu.max"), "w") as f:
            f.write(text + "\n")

    def count(self, cpus):
        """
        The default count and reason with C{cpus} CPUs in the affinity mask.
        """
        return default_serving_processes(
            self.root, self.proc_self_cgroup, lambda: set(range(cpus))
        )


class DefaultServingProcessesTests(SynchronousTestCase):
    """
    Tests for L{default_serving_processes}.
    """

    def test_affinity_without_quota(self):
        """
        With no quota anywhere, the count is the CPUs in the affinity mask,
        and the reason says so.
        """
        cgroups = FakeCgroups(self)
        cgroups.set_cpu_max("/kubepods", "max 100000")
        count, reason = cgroups.count(2)
        self.assertEqual(count, 2)
        self.assertIn("affinity of 2 CPUs", reason)

    def test_quota(self):
        """
        A quota of 3 CPUs on an 8-CPU machine makes 3 processes.
        """
        cgroups = FakeCgroups(self)
        cgroups.set_cpu_max("/kubepods/pod1/sentry", "300000 100000")
        count, reason = cgroups.count(8)
        self.assertEqual(count, 3)
        self.assertIn("quota of 3 CPUs", reason)

    def test_fractional_quota_rounds_up(self):
        """
        A quota of 1.5 CPUs makes 2 processes; one of 0.2 makes 1.
        """
        cgroups = FakeCgroups(self)
        cgroups.set_cpu_max("/kubepods/pod1/sentry", "150000 100000")
        self.assertEqual(cgroups.count(8)[0], 2)
        cgroups.set_cpu_max("/kubepods/pod1/sentry", "20000 100000")
        self.assertEqual(cgroups.count(8)[0], 1)

    def test_ancestor_quota(self):
        """
        The smallest quota of the cgroup and its ancestors counts.
        """
        cgroups = FakeCgroups(self)
        cgroups.set_cpu_max("/kubepods/pod1/sentry", "max 100000")
        cgroups.set_cpu_max("/kubepods/pod1", "200000 100000")
        cgroups.set_cpu_max("/kubepods", "1600000 100000")
        self.assertEqual(cgroups.count(16)[0], 2)

    def test_quota_above_affinity(self):
        """
        A quota larger than the affinity mask is bounded by the mask.
        """
        cgroups = FakeCgroups(self)
        cgroups.set_cpu_max("/kubepods/pod1/sentry", "400000 100000")
        self.assertEqual(cgroups.count(2)[0], 2)

    def test_cap(self):
        """
        More usable cores than the cap make the cap, and the reason says
        it was capped.
        """
        cgroups = FakeCgroups(self)
        count, reason = cgroups.count(64)
        self.assertEqual(count, MAX_DEFAULT_SERVING_PROCESSES)
        self.assertEqual(MAX_DEFAULT_SERVING_PROCESSES, 4)
        self.assertIn("capped at 4", reason)

    def test_no_cgroup_files(self):
        """
        Without cgroup files (no unified hierarchy), the affinity counts.
        """
        base = self.mktemp()
        count, reason = default_serving_processes(
            os.path.join(base, "missing"),
            os.path.join(base, "missing-proc"),
            lambda: {0, 1, 2},
        )
        self.assertEqual(count, 3)
        self.assertIn("affinity", reason)

    def test_container_root_cgroup(self):
        """
        In a container with its own cgroup namespace (C{0::/}), the quota
        of the root of the visible tree counts.
        """
        cgroups = FakeCgroups(self, own_path="/")
        cgroups.set_cpu_max("/", "100000 100000")
        self.assertEqual(cgroups.count(4)[0], 1)


class ParseTests(SynchronousTestCase):
    """
    Tests for L{parse_cpu_max} and L{cgroup_path}.
    """

    def test_parse_cpu_max(self):
        """
        C{cpu.max} lines are read as CPUs; no limit and garbage are None.
        """
        self.assertEqual(parse_cpu_max("200000 100000\n"), 2.0)
        self.assertEqual(parse_cpu_max("50000 100000"), 0.5)
        for text in ("max 100000", "", "abc def", "0 100000", "1 2 3"):
            self.assertIsNone(parse_cpu_max(text), text)

    def test_cgroup_path_v1_only(self):
        """
        A C{/proc/self/cgroup} with only cgroup v1 lines has no v2 path.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("4:cpu,cpuacct:/user\n2:memory:/user\n")
        self.assertIsNone(cgroup_path(path))
