// Mistakes the declarations must catch.
import { MeridianClient } from "./meridian.js";

const client = new MeridianClient({ token: 42 });
client.recordOutcome("maybe");
client.addEventListener("migrating", (e) => console.log(e.detail.nowhere));
