"""The agent contract in one place (standard library only): keruta-agent's exit codes and the reasons
the backends record for them. The agent exits with these; the Kubernetes and local backends read them."""

# Exit codes (documented in the README). EXIT_CONFIG is permanent: a Job's podFailurePolicy fails
# the Job at once on it (also used when the API refuses the agent for good: wrong token, task gone);
# EXIT_API_UNREACHABLE is transient: the flow may try the task again.
EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_CONFIG = 2
EXIT_API_UNREACHABLE = 3
EXIT_INTERNAL = 4
EXIT_TERMINATED = 143

# Reasons recorded for an attempt, by how its agent ended.
SCRIPT_FAILED = "SCRIPT_FAILED"
AGENT_CONFIG_ERROR = "AGENT_CONFIG_ERROR"
API_UNREACHABLE = "API_UNREACHABLE"
AGENT_ERROR = "AGENT_ERROR"
TERMINATED = "TERMINATED"
AGENT_KILLED = "AGENT_KILLED"  # killed by a signal (the local backend adds the signal's name)
