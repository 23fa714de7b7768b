"""ELBv2 for LocalStack community, served by LocalStack's own moto backend.

The community build ships the ELBv2 API spec and moto's implementation but no provider; this
registers one (entry point ``localstack.aws.provider`` / ``elbv2:default``) that forwards every
operation to moto. Test rig only.
"""

from localstack.aws.skeleton import Skeleton
from localstack.aws.spec import load_service
from localstack.services.moto import call_moto
from localstack.services.plugins import Service, aws_provider


def _forward(context, _request):
    return call_moto(context)


@aws_provider(api="elbv2")
def elbv2():
    spec = load_service("elbv2")
    handlers = {op: _forward for op in spec.operation_names}
    return Service(name="elbv2", skeleton=Skeleton(spec, handlers))
