import './base.css';
// the cluster graph's styles, from exo_lab's one renderer (the notebook widget's CSS)
import '../../../exo_lab/ui/static/topology.css';
