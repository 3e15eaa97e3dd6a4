"""rlctl.job.cluster.start_in_order: colocated engines are built (and asleep) before a trainer rank loads."""

from rlctl.job.cluster import start_in_order


class _Log(list):
    def gen(self, i):
        log = self

        class Start:
            @staticmethod
            def remote():
                log.append(f"start-sent {i}")
                return f"ref {i}"

        return type("Gen", (), {"start": Start})()

    def wait(self, refs):
        self.append(f"wait {', '.join(refs)}")

    def create(self):
        self.append("trainer processes created")
        return "actors"

    def setup(self, actors):
        self.append(f"trainer setup of {actors}")
        return "trainers"


def test_colocated_engines_finish_building_before_the_trainer_loads():
    log = _Log()
    assert start_in_order([log.gen(0), log.gen(1)], log.create, log.setup, True, log.wait) == "trainers"
    # the trainer processes start (imports, no GPU memory) while the engines build; they load only afterwards
    assert log == ["start-sent 0", "start-sent 1", "trainer processes created", "wait ref 0, ref 1",
                   "trainer setup of actors"]


def test_split_placement_starts_engines_and_trainer_together():
    log = _Log()
    assert start_in_order([log.gen(0)], log.create, log.setup, False, log.wait) == "trainers"
    assert log == ["start-sent 0", "trainer processes created", "trainer setup of actors", "wait ref 0"]


def test_without_a_trainer_only_the_engines_start():
    log = _Log()
    assert start_in_order([log.gen(0)], None, None, False, log.wait) is None
    assert log == ["start-sent 0", "wait ref 0"]
