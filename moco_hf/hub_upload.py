"""Background uploads of the trained model to the Hub: training never waits for them and never dies of them."""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import Future
from pathlib import Path

from huggingface_hub import HfApi

from .errors import first_line

logger = logging.getLogger(__name__)


class HubPublisher:
    """Uploads model folders to one Hub repo with `upload_folder(run_as_future=True)`.

    A failed repo creation or upload (server error, no network, bad token) is reported once as a warning; the
    local files are untouched and training goes on. `finish()` waits for the uploads still running.
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
        self.repo_id, self.revision, self.create_pr = repo_id, revision, create_pr
        self.uploads: list[Future] = []
        self.failures = 0
        try:
            self.repo_id = self.api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision is not None:
                self.api.create_branch(self.repo_id, branch=revision, exist_ok=True)
            self.ready = True
        except Exception as error:  # any failure of the Hub must leave training running
            self.ready = False
            self._report(error)

    def upload(self, folder: Path, message: str, remove_after: bool = False) -> None:
        """Start uploading `folder` (its files replace those of the repo); `remove_after` deletes it when done."""
        if not self.ready:
            return
        future = self.api.upload_folder(
            repo_id=self.repo_id,
            folder_path=folder,
            commit_message=message,
            revision=self.revision,
            create_pr=self.create_pr,
            run_as_future=True,
        )

        def done(finished: Future) -> None:
            if finished.exception() is not None:
                self._report(finished.exception())
            else:
                logger.info("Pushed %s to the Hub repo %s.", folder.name, self.repo_id)
            if remove_after:
                shutil.rmtree(folder, ignore_errors=True)

        future.add_done_callback(done)
        self.uploads.append(future)

    def finish(self) -> bool:
        """Wait for the uploads in flight; True when every one succeeded."""
        if any(not upload.done() for upload in self.uploads):
            logger.info("Waiting for the uploads to %s to finish...", self.repo_id)
        for upload in self.uploads:
            upload.exception()  # waits; failures were reported by the callback
        return self.ready and self.failures == 0

    def _report(self, error: BaseException) -> None:
        self.failures += 1
        if self.failures == 1:
            logger.warning(
                "Pushing to the Hub repo %s failed (%s: %s). The local model and checkpoints are complete and "
                "training goes on; upload them later with `hf upload %s <output_dir>/model`.",
                self.repo_id, type(error).__name__, first_line(error), self.repo_id,
            )  # fmt: skip
