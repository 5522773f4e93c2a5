// exo_lab for JupyterLab: a left side panel with the cluster that a notebook kernel or
// `exo-lab up` coordinates (read from the exo_lab server extension, /exo-lab/api/*).
import { ILabShell, ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { LabIcon } from '@jupyterlab/ui-components';

import { ClusterPanel } from './panel';

const PLUGIN_ID = 'exo-lab:panel';

export namespace CommandIDs {
  export const open = 'exo-lab:open-panel';
  export const refresh = 'exo-lab:refresh';
  export const dashboard = 'exo-lab:open-dashboard';
}

/** Three nodes and their links: the sidebar tab's icon. */
export const clusterIcon = new LabIcon({
  name: 'exo-lab:cluster',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">' +
    '<g class="jp-icon3" fill="#616161">' +
    '<path d="M6.2 16.6 11 8.3l1.7 1-4.8 8.3zM11.3 9.3l1.7-1 4.8 8.3-1.7 1zM7 18h10v2H7z"/>' +
    '<circle cx="12" cy="6" r="3.2"/><circle cx="5.5" cy="18.5" r="3.2"/><circle cx="18.5" cy="18.5" r="3.2"/>' +
    '</g></svg>'
});

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'exo_lab cluster side panel: nodes, links, instances, and a link to the dashboard.',
  autoStart: true,
  requires: [ILabShell],
  optional: [ILayoutRestorer, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    shell: ILabShell,
    restorer: ILayoutRestorer | null,
    palette: ICommandPalette | null
  ) => {
    const panel = new ClusterPanel(app.serviceManager.sessions);
    panel.title.icon = clusterIcon;
    shell.add(panel, 'left', { rank: 650 });
    if (restorer) {
      restorer.add(panel, 'exo-lab-panel');
    }

    app.commands.addCommand(CommandIDs.open, {
      label: 'exo_lab: Show the Cluster Panel',
      execute: () => shell.activateById(panel.id)
    });
    app.commands.addCommand(CommandIDs.refresh, {
      label: 'exo_lab: Refresh the Cluster Panel',
      execute: () => panel.refresh()
    });
    app.commands.addCommand(CommandIDs.dashboard, {
      label: 'exo_lab: Open the Dashboard',
      isEnabled: () => panel.dashboardAvailable,
      execute: () => panel.openDashboard()
    });
    if (palette) {
      for (const command of [CommandIDs.open, CommandIDs.refresh, CommandIDs.dashboard]) {
        palette.addItem({ command, category: 'exo_lab' });
      }
    }
  }
};

export default plugin;
