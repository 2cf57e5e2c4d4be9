"""Attribution: node identity, metrics, direct effects, act x grad, patching, ablation, steering, circuits."""

from .nodes import Node, NodeLike, as_node, as_nodes

__all__ = ["Node", "NodeLike", "as_node", "as_nodes"]
