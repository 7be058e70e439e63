"""`b1k-train k8s …`: training as KubeRay RayJobs rendered from the Helm chart, followed, cancelled, suspended;
the pipeline with one RayJob per training stage; rolling the policy server to a new champion."""
