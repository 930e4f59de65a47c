"""keruta_harness: a realistic Kubernetes cluster for tests (``keruta_harness.cluster.Cluster``), a throwaway
PostgreSQL (``postgres``) and the processes tests start (``processes``). ``python -m keruta_harness`` runs a
cluster on loopback for a person to try things against."""
