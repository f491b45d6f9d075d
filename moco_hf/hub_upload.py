"""Background uploads of the trained model to the Hub: training never waits for them and never dies of them."""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi

from .errors import first_line

if TYPE_CHECKING:
    from .modeling_moco import MocoForImageClassification

logger = logging.getLogger(__name__)

SNAPSHOT_PREFIX = ".hub-upload-"  # a copy of the model made for one upload, deleted when it is done


def remove_snapshots(output_dir: Path) -> None:
    """Snapshots left by a run that died while uploading them: never needed again."""
    for snapshot in output_dir.glob(f"{SNAPSHOT_PREFIX}*"):
        logger.warning("Removing %s, a model snapshot of an interrupted upload.", snapshot)
        shutil.rmtree(snapshot, ignore_errors=True)


@dataclass
class Upload:
    folder: Path
    message: str
    remove_after: bool  # a snapshot made for this upload, deleted once it is done (or abandoned)


class HubPublisher:
    """Creates one Hub repo and uploads model folders to it, in order, from a daemon thread.

    Nothing here blocks training: repo creation happens in the thread too, so a Hub that never answers costs the
    run nothing until `finish`, which waits at most `wait_seconds` and then says what was not uploaded and how to
    push it later (the thread, a daemon, does not keep the process alive). A failure (server error, no network, bad
    token) is one warning; the local files are complete either way.
    """

    def __init__(
        self,
        repo_id: str,
        token: str | None = None,
        private: bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> None:
        self.api = HfApi(token=token)
        self.repo_id, self.private, self.revision, self.create_pr = repo_id, private, revision, create_pr
        self.ready: bool | None = None  # None until the repo creation has answered
        self.failures = 0
        self.problem: str | None = None  # why something was not uploaded, in a few words
        self.jobs: queue.Queue[Upload] = queue.Queue()
        self.current: Upload | None = None
        self.last_queued: Upload | None = None
        self.last_pushed: Upload | None = None
        threading.Thread(target=self._work, name="hub-uploads", daemon=True).start()

    def upload(self, folder: Path, message: str, remove_after: bool = False) -> None:
        """Queue `folder` for upload (its files replace those of the repo); `remove_after` deletes it when done."""
        self.last_queued = Upload(folder, message, remove_after)
        self.jobs.put(self.last_queued)

    @property
    def busy(self) -> bool:
        """An upload is queued or in progress."""
        return self.jobs.unfinished_tasks > 0

    def finish(self, wait_seconds: float) -> bool:
        """Wait up to `wait_seconds` for the queued uploads; True when the last one (the final model) succeeded."""
        deadline = time.monotonic() + wait_seconds
        if self.jobs.unfinished_tasks:
            logger.info("Waiting up to %.0f s for the uploads to %s...", wait_seconds, self.repo_id)
        with self.jobs.all_tasks_done:
            while self.jobs.unfinished_tasks and time.monotonic() < deadline:
                self.jobs.all_tasks_done.wait(timeout=max(0.0, deadline - time.monotonic()))
        if self.jobs.unfinished_tasks:
            self._give_up(wait_seconds)
            return False
        return self.last_pushed is self.last_queued is not None

    def status_line(self, pushed: bool, model_folder: Path) -> str:
        """The run's last line about the Hub: where the model went, or what was not uploaded and how to do it."""
        if pushed:
            return f"Pushed to the Hub: {self.repo_id}"
        return (f"NOT pushed to the Hub ({self.problem}): the local model is complete; upload it with "
                f"`hf upload {self.repo_id} {model_folder}`")  # fmt: skip

    def _work(self) -> None:
        try:
            self.repo_id = self.api.create_repo(self.repo_id, private=self.private, exist_ok=True).repo_id
            if self.revision is not None:
                self.api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
            self.ready = True
        except Exception as error:  # any failure of the Hub must leave training running
            self.ready = False
            self._report(error)
        while True:
            self.current = self.jobs.get()
            try:
                if self.ready:
                    self.api.upload_folder(repo_id=self.repo_id, folder_path=self.current.folder,
                                           commit_message=self.current.message, revision=self.revision,
                                           create_pr=self.create_pr)  # fmt: skip
                    self.last_pushed = self.current
                    logger.info("Pushed %s to the Hub repo %s.", self.current.folder.name, self.repo_id)
            except Exception as error:
                self._report(error)
            finally:
                if self.current.remove_after:
                    shutil.rmtree(self.current.folder, ignore_errors=True)
                self.current = None
                self.jobs.task_done()

    def _give_up(self, wait_seconds: float) -> None:
        """Leave the hung uploads to the daemon thread; delete the snapshots made for them."""
        abandoned = [self.current] if self.current else []
        while True:
            try:
                abandoned.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        for upload in abandoned:
            if upload.remove_after:
                shutil.rmtree(upload.folder, ignore_errors=True)
        final = [str(u.folder) for u in abandoned if not u.remove_after]
        self.problem = self.problem or f"the Hub did not answer within {wait_seconds:.0f} s"
        logger.warning(
            "The Hub did not answer within %.0f s: %s not uploaded to %s. The local files are complete; push them "
            "later with `hf upload %s %s`.",
            wait_seconds, ", ".join(final) or "checkpoint snapshots", self.repo_id, self.repo_id,
            final[0] if final else "<output_dir>/model",
        )  # fmt: skip

    def _report(self, error: BaseException) -> None:
        self.failures += 1
        self.problem = self.problem or f"{type(error).__name__}: {first_line(error)}"
        if self.failures == 1:
            logger.warning(
                "Pushing to the Hub repo %s failed (%s: %s). The local model and checkpoints are complete and "
                "training goes on; upload them later with `hf upload %s <output_dir>/model`.",
                self.repo_id, type(error).__name__, first_line(error), self.repo_id,
            )  # fmt: skip


def push_classifier(
    model: MocoForImageClassification,
    repo_id: str,
    eval_metrics: dict[str, float] | None,
    eval_dataset: str | None,
    eval_split: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
) -> Any:
    """`MocoForImageClassification.push_to_hub`: the saved classifier (weights, config, code, image processor) and
    its card (`classifier_card`) in one commit; returns the commit's `CommitInfo`, as transformers does."""
    from .model_card import classifier_card

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    card = classifier_card(model, repo_id, eval_metrics, eval_dataset, eval_split, tags)  # checks before uploading
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        card.save(Path(folder) / "README.md")
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or "Upload MoCo classifier",
                                 commit_description=commit_description)  # fmt: skip
