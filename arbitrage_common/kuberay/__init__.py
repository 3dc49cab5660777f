"""KubeRay rendering: AppConfig -> RayService manifests, worker-group sizes, kustomize overlays.
Pure logic (pydantic, yaml): no Ray import, no cluster needed."""
