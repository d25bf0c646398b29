"""A wrapper using the optional members the guide lists: check_stack, workspace_requests,
weight_specs, describe and report."""

import attrs
import torch

import moeframe


@attrs.frozen
class StagingParams:
    max_tokens: int = moeframe.option(64, help="rows of the staging buffer", min=1)


class StagingWrapper(moeframe.Wrapper):
    Params = StagingParams

    def __init__(self, inner, context, params):
        super().__init__(inner, context, params)
        self.context = context
        self.calls = 0
        self.staged_rows = 0

    @classmethod
    def check_stack(cls, config):
        if config.parallel.tp_size > 1:
            return "old_staging does not support tensor parallelism (parallel.tp_size must be 1)"
        return None

    def _requests(self):
        model = self.context.model
        return [moeframe.WorkspaceRequest("old_staging.x", (self.params.max_tokens, model.hidden_size), model.torch_dtype)]

    def workspace_requests(self):
        return self._requests()

    def forward(self, hidden_states, router_logits):
        self.calls += 1
        (buffer,) = self.context.workspace.views(self._requests(), hidden_states.device)
        rows = min(hidden_states.shape[0], buffer.shape[0])
        buffer[:rows].copy_(hidden_states[:rows])
        self.staged_rows += rows
        staged = torch.cat([buffer[:rows], hidden_states[rows:]])
        return self.inner.forward(staged, router_logits)

    def describe(self):
        return {"max_tokens": self.params.max_tokens}

    def report(self):  # `moeframe run` prints what a part's report() returns
        return {"summary": f"old_staging: {self.calls} calls, {self.staged_rows} rows staged"}
