"""Which ticket serves which input: partitions (training) and routers (inference)."""
from rtl_plugin.routing.partition import (Partition, by_class, by_condition, by_groups, by_kmeans, create_partitioner,
                                          embed, list_partitioners, register_partitioner)
from rtl_plugin.routing.feature_clusters import FeatureClusters
from rtl_plugin.routing.gate import Gate, load_balance_loss, matched_accuracy, routing_entropy, straight_through_route
from rtl_plugin.routing.routers import Router, create_router, list_routers, register_router, route_accuracy

__all__ = ["Partition", "Router", "by_class", "by_condition", "by_groups", "by_kmeans", "create_partitioner",
           "create_router", "embed", "list_partitioners", "list_routers", "register_partitioner", "register_router",
           "route_accuracy"]
__all__ += ["FeatureClusters", "Gate", "load_balance_loss", "matched_accuracy", "routing_entropy", "straight_through_route"]
