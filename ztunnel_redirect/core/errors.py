"""The project's error hierarchy. Library exceptions are translated once, at the adapter."""


class RedirectError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(RedirectError):
    """Bad settings or arguments: the operator must fix something."""


class CapabilityError(RedirectError):
    """The machine lacks something we need (libnftables, nft version, privileges)."""


class NetnsNotFoundError(RedirectError):
    """A network namespace path does not exist (any more) or is not a netns."""


class KernelError(RedirectError):
    """The kernel refused a change or a read (nftables or rtnetlink)."""


class NotFoundError(KernelError):
    """The object asked for does not exist (e.g. a table that was never installed)."""


class RetryableError(RedirectError):
    """A transient failure: the work item is retried with backoff."""


PERMANENT_ERRORS = (ConfigError, CapabilityError)
"""Errors that cannot heal by themselves: trying again changes nothing until someone changes
the input (the pod, the settings, the machine)."""


def retryable(error: BaseException) -> bool:
    """Whether work that failed with `error` is worth retrying (the keyed queue's retry policy).
    Work that is not is dropped until an event brings it back, and counted."""
    return not isinstance(error, PERMANENT_ERRORS)
