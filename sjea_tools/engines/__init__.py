"""Engines that run the shard flow of sjea_tools.pipeline on many machines.

    from sjea_tools.engines.ray import embed_with_ray
    embed_with_ray("photos/", "photos.h5", partitions=8, run="runs/tiny")   # local Ray
    embed_with_ray("/shared/photos", "/shared/photos.h5", partitions=64, address="head:6379")

Modules: `ray` (embed_with_ray: Ray core tasks, one partition = one shard store each, merged by the
driver; ray_session). An engine is imported only when used: `pip install 'sjea-tools[ray]'` adds Ray.
"""
