// ES module entry point: `import { followJob } from "/static/task_ferry/ferry.mjs";`
import "./ferry.js";

const TaskFerry = globalThis.TaskFerry;

export const {
  TERMINAL_STATES,
  TaskFerryError,
  ProgressElement,
  isTerminal,
  getCookie,
  backoffDelay,
  fetchJob,
  startJob,
  cancelJob,
  followJob,
  mountProgress,
} = TaskFerry;

export default TaskFerry;
