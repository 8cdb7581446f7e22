from wit_world import exports
from wit_world.imports import types


class XactJob(exports.XactJob):
    def run(self, ctx, tx):
        return types.Report(summary="noop")
